//! The conformance suite against the slot without CANN: every case fails,
//! cleanly, with an error naming the backend; none panics.

use moe_hal_cann::{CannBackend, Probe};
use moe_hal_core::conformance;

#[test]
fn suite_fails_cleanly_without_cann() {
    let b = CannBackend::from_probe(Probe::empty());
    let report = conformance::run_all(&b, true);
    assert!(!report.passed());
    assert!(!report.results.is_empty());
    for r in &report.results {
        let msg = r.failure.as_deref().unwrap_or("");
        assert!(!msg.contains("PANIC"), "{} {}: {msg}", r.kernel, r.case);
    }
    // Cases that got as far as a call name CANN as unavailable.
    let named = report
        .results
        .iter()
        .filter_map(|r| r.failure.as_deref())
        .filter(|m| m.contains("backend cann is unavailable"));
    assert!(named.count() > 0, "{report}");
}
