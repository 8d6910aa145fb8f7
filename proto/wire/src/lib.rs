//! Generated protobuf and gRPC code (placeholder).
