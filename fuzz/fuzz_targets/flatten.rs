//! Fuzz target `flatten`: the bytes as an upstream reply to `www.example.` A/AAAA, through
//! `flatten::follow` (chain of at most 11 hops) and, when the chain is complete,
//! `flatten::build`. Invariants (F1, F2, R19, R20): the chain starts at the question name and
//! follows CNAMEs of the input without revisiting a name; the output scans, holds no CNAME,
//! owns every record by a pointer to the question, carries TTL = min over links and final
//! records (so never above any), and only rdata from the input's final RRset.
//!
//! The same bytes also drive a structured generator ([`flatdns_fuzz::build_chain`]) so the
//! fuzzer reaches `Done` often; for generated chains the exact outcome is known and checked.
#![no_main]

use arbitrary::Unstructured;
use flatdns::flatten::Step;
use flatdns_fuzz::{build_chain, check_flatten, question, Expect, START_MIXED, TYPE_A, TYPE_AAAA};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Raw: the input is the upstream's reply.
    for qtype in [TYPE_A, TYPE_AAAA] {
        check_flatten(data, qtype, &question(START_MIXED, qtype));
    }

    // Structured: the input drives a chain generator.
    let mut u = Unstructured::new(data);
    let built = build_chain(&mut u);
    let step = check_flatten(&built.msg, built.qtype, &question(START_MIXED, built.qtype));
    match (&built.expect, &step) {
        (Expect::Done(want), Step::Done(rrs)) => {
            let got: Vec<&[u8]> = rrs.iter().map(|r| &r.rdata[..]).collect();
            let want: Vec<&[u8]> = want.iter().map(|w| &w[..]).collect();
            assert_eq!(got, want, "wrong final RRset");
        }
        (Expect::Done(_), other) => panic!("clean chain not flattened: {other:?}"),
        (Expect::NotDone, Step::Done(_)) => panic!("defective chain flattened"),
        (Expect::NotDone, _) => {}
    }
    if let Step::Done(rrs) = &step {
        for r in rrs {
            assert!(
                !built.unrelated.iter().any(|u| u[..] == r.rdata[..]),
                "record off the chain used (R19)"
            );
        }
    }
});
