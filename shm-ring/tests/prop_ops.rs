//! Property tests: random interleavings of driver and device operations keep the two sides
//! in agreement (FIFO, identical bytes, matching used ids, no descriptor leak), including
//! across the wrap-around of the 16-bit ring indices.

mod common;

use common::harness::{ChainSpec, Harness, MAX_SEGS, MAX_SEG_LEN};
use common::*;
use proptest::collection::vec;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Add(ChainSpec),
    Publish,
    /// Device pops up to n chains.
    Pop(usize),
    /// Device completes up to n held chains (random order), publishing or not.
    Complete(usize, bool),
    /// Driver reaps up to n used chains.
    Reap(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let seg_len = prop_oneof![1 => Just(0u32), 8 => 1..=MAX_SEG_LEN];
    let add = (
        vec((seg_len, any::<bool>()), 1..=MAX_SEGS),
        any::<bool>(),
        0u8..16,
    )
        .prop_map(|(mut segs, indirect, misalign)| {
            segs.sort_by_key(|&(_, w)| w);
            Op::Add(ChainSpec {
                segs,
                indirect,
                table_misalign: misalign,
            })
        });
    prop_oneof![
        5 => add,
        2 => Just(Op::Publish),
        2 => (0usize..6).prop_map(Op::Pop),
        2 => (0usize..6, prop::bool::weighted(0.8)).prop_map(|(n, p)| Op::Complete(n, p)),
        2 => (0usize..6).prop_map(Op::Reap),
    ]
}

fn run(h: &mut Harness, ops: &[Op], indirect_feature: bool) {
    for op in ops {
        match op {
            Op::Add(spec) => {
                let mut spec = spec.clone();
                spec.indirect &= indirect_feature;
                h.add(&spec);
            }
            Op::Publish => h.publish(),
            Op::Pop(n) => h.device_pop(*n),
            Op::Complete(n, p) => h.device_complete(*n, *p),
            Op::Reap(n) => h.driver_reap(*n),
        }
        h.check_accounting();
    }
    h.drain();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Queue sizes 1..=256 (powers of two), random feature sets, random op sequences.
    #[test]
    fn random_operation_sequences(
        size_log in 0u32..=8,
        event_idx in any::<bool>(),
        indirect in any::<bool>(),
        seed in any::<u64>(),
        ops in vec(op(), 1..250),
    ) {
        let size = 1u16 << size_log;
        let mut h = Harness::new(size, features(event_idx, indirect), seed);
        run(&mut h, &ops, indirect);
        prop_assert_eq!(h.stats.added, h.stats.reaped);
        prop_assert_eq!(h.stats.popped, h.stats.reaped);
    }
}

/// Small chains with little data so that many can go through quickly.
fn small_spec(h: &mut Harness, indirect: bool) -> ChainSpec {
    let n = h.rng.range(1, 3) as usize;
    let mut segs: Vec<(u32, bool)> = (0..n)
        .map(|_| (h.rng.range(0, 24) as u32, h.rng.chance(1, 2)))
        .collect();
    segs.sort_by_key(|&(_, w)| w);
    ChainSpec {
        segs,
        indirect,
        table_misalign: h.rng.below(16) as u8,
    }
}

/// More than 2 × 65536 chains through queues of size 4 and 1: the 16-bit avail and used
/// indices wrap (twice), with batches of every length up to the queue size straddling the
/// wrap, and nothing is lost, duplicated or reordered.
#[test]
fn sixteen_bit_indices_wrap() {
    for (size, chains) in [(4u16, 140_000u64), (1, 70_000)] {
        let mut h = Harness::new(size, ALL_FEATURES, size as u64);
        let mut avail_wraps = 0;
        let mut used_wraps = 0;
        let mut last_avail = 0u16;
        let mut last_used = 0u16;
        while h.stats.added < chains {
            let k = h.rng.range(1, size as u64);
            for _ in 0..k {
                let ind = h.rng.chance(1, 3);
                let spec = small_spec(&mut h, ind);
                h.add(&spec);
            }
            h.publish();
            let n = h.rng.range(0, size as u64) as usize;
            h.device_pop(n);
            let n = h.rng.range(0, size as u64) as usize;
            h.device_complete(n, true);
            let n = h.rng.range(0, size as u64) as usize;
            h.driver_reap(n);
            if h.chains_in_flight() == size as usize {
                // Keep the ring moving: everything through.
                h.device_pop(usize::MAX);
                h.device_complete(usize::MAX, true);
                h.driver_reap(usize::MAX);
            }
            h.check_accounting();
            let (a, u) = (h.dev.next_avail(), h.dev.next_used());
            if a < last_avail {
                avail_wraps += 1;
            }
            if u < last_used {
                used_wraps += 1;
            }
            last_avail = a;
            last_used = u;
        }
        h.drain();
        assert_eq!(h.stats.reaped, h.stats.added);
        let expect_wraps = h.stats.added / 65536;
        assert_eq!(avail_wraps, expect_wraps, "avail index wrapped");
        assert!(
            used_wraps >= expect_wraps - 1 && used_wraps <= expect_wraps,
            "used index wrapped"
        );
        assert!(h.stats.added >= chains);
        assert_eq!(h.rig.avail_idx(), h.stats.added as u16);
        assert_eq!(h.rig.used_idx(), h.stats.added as u16);
    }
}
