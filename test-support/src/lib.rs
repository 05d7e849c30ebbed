//! Test support for the AI-Block workspace, kept out of the product: a
//! dev-dependency of `relay`, `miner` and `web-node` only, never a normal
//! dependency (check: `cargo tree -p relay -e normal`, `cargo tree -p miner
//! -e normal`), so no release binary contains it.
//!
//! * [`pg`]: a throwaway PostgreSQL server ([`pg::TestPg`]).
//! * [`usage_conformance`]: the usage ledger's behaviour suites, run on
//!   redb and on PostgreSQL.
//! * [`relay`]: the one in-process test relay ([`relay::TestRelay`], through
//!   the production accept loop) and the real binary as a child
//!   ([`relay::ChildRelay`]).
//! * [`http`]: a blocking HTTP client for tests.
//! * [`chain`]: a signed tiny chain.
#![allow(clippy::print_stderr)]

pub mod chain;
pub mod http;
pub mod pg;
pub mod relay;
pub mod usage_conformance;
