//! The X.509 forms of a bundle's authorities: PEM `CERTIFICATE` blocks and concatenated DER.

use pem::{EncodeConfig, LineEnding, Pem};
use spki::der::{Header, Reader as _, SliceReader, Tag};

use super::{BundleError, MAX_X509_AUTHORITIES_LEN};

/// The PEM label of a certificate.
const CERTIFICATE_LABEL: &str = "CERTIFICATE";

/// Splits concatenated DER certificates (the Workload API's `bundle`, `federated_bundles` and
/// `x509_svid` byte fields) into one slice per certificate.
///
/// Only the ASN.1 framing is checked here: every element must be a DER `SEQUENCE` with a
/// definite length that fits in the remaining input, with nothing left over. Truncated or
/// hostile input yields an error, never a panic. Whether each element is a certificate is left
/// to the parser that consumes it. Input longer than [`MAX_X509_AUTHORITIES_LEN`] is refused.
pub fn split_der_certificates(der: &[u8]) -> Result<Vec<&[u8]>, BundleError> {
    if der.len() > MAX_X509_AUTHORITIES_LEN {
        return Err(BundleError::TooLarge { max: MAX_X509_AUTHORITIES_LEN });
    }
    let framing_error = |offset: usize, reason: String| BundleError::DerFraming { offset, reason };
    let mut reader = SliceReader::new(der).map_err(|error| framing_error(0, error.to_string()))?;
    let mut certificates = Vec::new();
    while !reader.is_finished() {
        let offset = usize::try_from(reader.position()).unwrap_or(usize::MAX);
        let header = Header::peek(&reader).map_err(|error| framing_error(offset, error.to_string()))?;
        if header.tag() != Tag::Sequence {
            return Err(framing_error(offset, format!("expected a SEQUENCE, found {}", header.tag())));
        }
        let element = reader.tlv_bytes().map_err(|error| framing_error(offset, error.to_string()))?;
        certificates.push(element);
    }
    Ok(certificates)
}

/// Reads the `CERTIFICATE` blocks of a PEM document, in order, as DER.
///
/// Text outside the blocks is ignored (as PEM readers customarily do); any other block type
/// (a private key, say) is an error, because a trust bundle holding one is almost certainly a
/// mistake. Input longer than [`MAX_X509_AUTHORITIES_LEN`] is refused.
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, BundleError> {
    if pem.len() > MAX_X509_AUTHORITIES_LEN {
        return Err(BundleError::TooLarge { max: MAX_X509_AUTHORITIES_LEN });
    }
    pem::parse_many(pem)
        .map_err(BundleError::Pem)?
        .into_iter()
        .map(|block| {
            if block.tag() == CERTIFICATE_LABEL {
                Ok(block.into_contents())
            } else {
                Err(BundleError::UnexpectedPemBlock(block.tag().to_owned()))
            }
        })
        .collect()
}

/// Encodes DER certificates as consecutive PEM `CERTIFICATE` blocks with `\n` line endings.
pub fn encode_pem_certificates<'a>(certificates: impl IntoIterator<Item = &'a [u8]>) -> String {
    let config = EncodeConfig::new().set_line_ending(LineEnding::LF);
    certificates.into_iter().map(|der| pem::encode_config(&Pem::new(CERTIFICATE_LABEL, der), config)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sequences_and_rejects_bad_framing() {
        let two = [0x30, 0x01, 0x05, 0x30, 0x00];
        assert_eq!(split_der_certificates(&two).unwrap(), vec![&[0x30, 0x01, 0x05][..], &[0x30, 0x00][..]]);
        assert!(split_der_certificates(&[]).unwrap().is_empty());
        for bad in [
            &[0x30][..],               // truncated header
            &[0x30, 0x05, 0x01],       // length beyond input
            &[0x02, 0x01, 0x00],       // INTEGER, not SEQUENCE
            &[0x30, 0x80, 0x00, 0x00], // indefinite length (BER)
            &[0x30, 0x81, 0x01, 0x00], // non-minimal length
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x00, 0xff],
        ] {
            assert!(split_der_certificates(bad).is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn pem_rejects_other_blocks() {
        let pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            parse_pem_certificates(pem.as_bytes()),
            Err(BundleError::UnexpectedPemBlock(label)) if label == "PRIVATE KEY"
        ));
        assert!(parse_pem_certificates(b"no pem here").unwrap().is_empty());
    }

    #[test]
    fn pem_round_trips_bytes() {
        let blocks = [&b"\x30\x00"[..], b"\x30\x01\x00"];
        let pem = encode_pem_certificates(blocks);
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----\n").count(), 2);
        assert!(!pem.contains('\r'));
        assert_eq!(parse_pem_certificates(pem.as_bytes()).unwrap(), blocks);
    }
}
