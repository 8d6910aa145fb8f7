//! [`X509Authorities`] for bundles: the X.509-SVID validator's view of a bundle.

use super::{Bundle, BundleSet};
use crate::spiffe_id::TrustDomain;
use crate::x509::X509Authorities;

impl X509Authorities for Bundle {
    /// The bundle's CA certificates when `trust_domain` is its own and it has any; `None`
    /// otherwise (no X.509 authorities means the trust domain does not support X.509-SVIDs).
    fn x509_authorities(&self, trust_domain: &TrustDomain) -> Option<Vec<&[u8]>> {
        if *trust_domain != self.trust_domain || self.x509_authorities.is_empty() {
            return None;
        }
        Some(Bundle::x509_authorities(self).collect())
    }
}

impl X509Authorities for BundleSet {
    /// The CA certificates of the bundle of `trust_domain` only.
    fn x509_authorities(&self, trust_domain: &TrustDomain) -> Option<Vec<&[u8]>> {
        X509Authorities::x509_authorities(self.get(trust_domain)?, trust_domain)
    }
}
