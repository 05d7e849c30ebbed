//! Block stores.
