//! The usage ledger's behaviour suites (`test_support::usage_conformance`)
//! on the embedded store (redb); `usage_pg` runs the same suites on
//! PostgreSQL. (Unit tests of `relay::usage` until the suites moved out of
//! the relay library.)

use relay::usage::Usage;
use test_support::usage_conformance as conformance;

/// A redb ledger in `dir`, opened again at each call.
fn redb(dir: &tempfile::TempDir) -> impl Fn() -> Usage + '_ {
    move || Usage::open(&dir.path().join("usage.redb")).expect("open")
}

#[test]
fn counters_survive_reopen_after_flush() {
    let dir = tempfile::tempdir().expect("tmp");
    conformance::counters_survive_reopen_after_flush(&redb(&dir));
}

#[test]
fn reports_are_checked_deduplicated_and_capped() {
    let dir = tempfile::tempdir().expect("tmp");
    conformance::reports_are_checked_deduplicated_and_capped(&redb(&dir));
}

#[test]
fn rewards_pay_each_unit_once_and_survive_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    conformance::rewards_pay_each_unit_once_and_survive_restart(&redb(&dir));
}

/// The README's worked example ("Usage and rewards"), computed.
#[test]
fn worked_example_of_the_readme() {
    let dir = tempfile::tempdir().expect("tmp");
    conformance::worked_example_of_the_readme(&redb(&dir));
}
