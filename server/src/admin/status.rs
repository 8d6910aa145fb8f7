//! The one mapping from datastore errors to gRPC statuses.

use tonic::Status;

use crate::datastore::{DataStoreError, error_chain};

/// The gRPC status for a datastore error. Caller mistakes keep their message; server-side
/// failures are logged with their whole cause chain and reported with it too (the admin
/// socket only admits the server's own uid and root, so nothing leaks to strangers).
pub(crate) fn datastore_status(err: DataStoreError) -> Status {
    let message = err.to_string();
    match err {
        DataStoreError::NotFound { .. } | DataStoreError::TokenNotFound => Status::not_found(message),
        DataStoreError::AlreadyExists { .. } => Status::already_exists(message),
        DataStoreError::Conflict { .. } => Status::aborted(message),
        DataStoreError::InvalidArgument { .. } => Status::invalid_argument(message),
        DataStoreError::TokenExpired { .. } | DataStoreError::NodeBanned { .. } => Status::failed_precondition(message),
        DataStoreError::ResyncRequired { .. } => Status::out_of_range(message),
        DataStoreError::Corrupt { .. } | DataStoreError::UnsupportedSchema { .. } => {
            tracing::error!(error = %message, "datastore holds data this server cannot read");
            Status::data_loss(message)
        }
        DataStoreError::Open { .. } | DataStoreError::Backend { .. } => {
            let chain = error_chain(&err);
            tracing::error!(error = %chain, "datastore failure");
            Status::unavailable(chain)
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::datastore::ResourceKind;

    #[test]
    fn codes() {
        let cases = [
            (DataStoreError::NotFound { kind: ResourceKind::Entry, id: "e".into() }, Code::NotFound),
            (
                DataStoreError::AlreadyExists { kind: ResourceKind::Entry, id: "e".into(), reason: "dup".into() },
                Code::AlreadyExists,
            ),
            (DataStoreError::InvalidArgument { field: "selectors", reason: "empty".into() }, Code::InvalidArgument),
            (DataStoreError::backend("write", std::io::Error::other("disk full")), Code::Unavailable),
        ];
        for (err, code) in cases {
            assert_eq!(datastore_status(err).code(), code);
        }
        let status = datastore_status(DataStoreError::backend("write", std::io::Error::other("disk full")));
        assert_eq!(status.message(), "datastore write failed: disk full");
    }
}
