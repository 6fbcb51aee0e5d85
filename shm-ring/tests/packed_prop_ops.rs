//! Property tests for packed rings: random interleavings of driver and device operations
//! keep the two sides in agreement (FIFO, identical bytes, matching ids, no descriptor
//! leak), for any queue size, over many laps of both wrap counters.

mod common;
mod packed_common;

use common::*;
use packed_common::*;
use proptest::collection::vec;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Add(ChainSpec),
    Publish,
    Pop(usize),
    Complete(usize, bool),
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

fn run(h: &mut PackedHarness, ops: &[Op], indirect_feature: bool) {
    for op in ops {
        match op {
            Op::Add(spec) => {
                let mut spec = spec.clone();
                spec.indirect &= indirect_feature;
                // A direct chain longer than the ring can never be added; trim it.
                spec.segs.truncate(h.rig.size as usize);
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
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Queue sizes 1..=300 (mostly small, so the ring wraps), random features and ops.
    #[test]
    fn random_operation_sequences(
        size in prop_oneof![4 => 1u16..=12, 1 => 13u16..=300],
        event_idx in any::<bool>(),
        indirect in any::<bool>(),
        in_order in any::<bool>(),
        seed in any::<u64>(),
        ops in vec(op(), 1..300),
    ) {
        let f = with_in_order(features(event_idx, indirect), in_order);
        let mut h = PackedHarness::new(size, f, seed);
        run(&mut h, &ops, indirect);
        prop_assert_eq!(h.stats.added, h.stats.reaped);
        prop_assert_eq!(h.stats.popped, h.stats.reaped);
    }
}

/// Hundreds of thousands of small chains through rings of size 1, 3 and 4: positions and
/// wrap counters go round thousands of times, batches of every length straddle the end
/// (also under IN_ORDER, where runs of read-only chains share one used descriptor).
#[test]
fn many_laps() {
    for (size, chains, in_order) in [
        (3u16, 60_000u64, false),
        (1, 20_000, false),
        (4, 60_000, false),
        (3, 60_000, true),
        (5, 60_000, true),
    ] {
        let f = with_in_order(ALL_FEATURES, in_order);
        let mut h = PackedHarness::new(size, f, size as u64);
        while h.stats.added < chains {
            let k = h.rng.range(1, size as u64);
            for _ in 0..k {
                let ind = h.rng.chance(1, 3);
                let n = h.rng.range(1, size.min(3) as u64) as usize;
                let mut segs: Vec<(u32, bool)> = (0..n)
                    .map(|_| (h.rng.range(0, 24) as u32, h.rng.chance(1, 2)))
                    .collect();
                segs.sort_by_key(|&(_, w)| w);
                let misalign = h.rng.below(16) as u8;
                h.add(&ChainSpec {
                    segs,
                    indirect: ind,
                    table_misalign: misalign,
                });
            }
            h.publish();
            let n = h.rng.range(0, size as u64) as usize;
            h.device_pop(n);
            let n = h.rng.range(0, size as u64) as usize;
            h.device_complete(n, true);
            let n = h.rng.range(0, size as u64) as usize;
            h.driver_reap(n);
            if h.chains_in_flight() == size as usize {
                h.device_pop(usize::MAX);
                h.device_complete(usize::MAX, true);
                h.driver_reap(usize::MAX);
            }
            h.check_accounting();
        }
        h.drain();
        assert_eq!(h.stats.reaped, h.stats.added);
        assert!(
            h.stats.avail_wraps > 5_000 && h.stats.used_wraps > 5_000,
            "{:?}",
            h.stats
        );
    }
}
