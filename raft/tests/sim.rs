//! Deterministic simulation of Raft clusters under faults (see `flotilla_raft::testing::sim`).
//!
//! `cargo test -p flotilla-raft --features testing --test sim` runs the default seeds;
//! `SIM_SEEDS=n` runs seeds 0..n, `SIM_STEPS=n` makes each run longer, `SEED=n` replays one.

use flotilla_raft::testing::sim::{run, seeds_from_env, SimOptions};
use std::time::Instant;

/// Seeds of the default run (on two cores, in a debug build).
const DEFAULT_SEEDS: u64 = 1000;

#[test]
fn simulated_clusters_stay_safe_and_linearizable() {
    let (seeds, steps) = seeds_from_env(DEFAULT_SEEDS);
    let opts = SimOptions { steps, ..SimOptions::default() };
    let started = Instant::now();
    let mut totals = (0, 0, 0, 0, 0, 0);
    let (mut refused, mut corrupted) = (0, 0);
    for seed in &seeds {
        match run(*seed, &opts) {
            Ok(r) => {
                totals.0 += r.ops_ok;
                totals.1 += r.ops_unknown;
                totals.2 += r.leaders_elected;
                totals.3 += r.crashes;
                totals.4 += r.snapshots_installed;
                totals.5 += r.membership_changes;
                refused += r.snapshots_refused;
                corrupted += r.chunks_corrupted;
            }
            Err(f) => panic!("{f}"),
        }
    }
    eprintln!(
        "{} seeds x {steps} steps in {:?}: {} ops ok, {} unknown, {} leaders, {} crashes, {} snapshots installed ({corrupted} chunks corrupted, {refused} snapshots refused), {} configuration changes",
        seeds.len(),
        started.elapsed(),
        totals.0,
        totals.1,
        totals.2,
        totals.3,
        totals.4,
        totals.5
    );
    // The run must actually exercise the protocol, or passing means nothing.
    if seeds.len() >= 50 {
        assert!(totals.0 > seeds.len() * 5, "too few operations completed: {totals:?}");
        assert!(totals.3 > 0 && totals.4 > 0 && totals.5 > 0, "faults and reconfigurations happened: {totals:?}");
    }
    if seeds.len() >= 500 {
        // About one seed in seventy corrupts a chunk of a snapshot it needed.
        assert!(refused > 0, "corrupt snapshots were refused and the transfers started over: {totals:?}");
    }
}

/// Seeds that found bugs in the core. The simulator's choices depend on its code, so a seed
/// replays its original scenario only as long as the simulator is unchanged; each bug also
/// has a targeted engine test. They stay here as extra coverage.
#[test]
fn regression_seeds() {
    // 1531: a node removed by a configuration entry only it held never campaigned, and the
    // others could not win without its vote (engine test:
    // a_node_removed_by_an_uncommitted_configuration_still_campaigns).
    // 508: a candidate behind on terms was never told the current term (stale vote requests
    // went unanswered) and could never win (engine test:
    // a_vote_request_from_an_older_term_is_refused_with_our_term).
    for seed in [1531, 508] {
        if let Err(f) = run(seed, &SimOptions::default()) {
            panic!("{f}");
        }
    }
}

/// Seeds of the read-race profile in the default run.
const READ_RACE_SEEDS: u64 = 300;

/// Schedules aimed at the read path (`SimOptions::read_races`): leaders paused past their
/// lease, isolated and transferring while most operations are reads, clocks at the edge of
/// the allowed drift.
#[test]
fn reads_racing_pauses_partitions_and_transfers_stay_linearizable() {
    let (seeds, steps) = seeds_from_env(READ_RACE_SEEDS);
    let opts = SimOptions { steps, ..SimOptions::read_races() };
    let started = Instant::now();
    let (mut ok, mut leaders) = (0, 0);
    for seed in &seeds {
        match run(*seed, &opts) {
            Ok(r) => {
                ok += r.ops_ok;
                leaders += r.leaders_elected;
            }
            Err(f) => panic!("{f}"),
        }
    }
    eprintln!("read races: {} seeds in {:?}: {ok} ops ok, {leaders} leaders", seeds.len(), started.elapsed());
    if seeds.len() >= 50 {
        assert!(ok > seeds.len() * 5 && leaders > seeds.len() * 2, "the profile must exercise reads and elections");
    }
}

/// Seeds of the lease-edge profile in the default run.
const LEASE_EDGE_SEEDS: u64 = 40;

/// The race at the end of a leader's lease (`SimOptions::lease_edges`): a rival elected the
/// moment the followers' promise ends writes, then the isolated old leader is asked for lease
/// reads. A lease that outlives the promise shows up as a stale read.
#[test]
fn lease_reads_at_the_end_of_the_promise_stay_linearizable() {
    let (seeds, steps) = seeds_from_env(LEASE_EDGE_SEEDS);
    let opts = SimOptions { steps, ..SimOptions::lease_edges() };
    let started = Instant::now();
    let (mut ok, mut races) = (0, 0);
    for seed in &seeds {
        match run(*seed, &opts) {
            Ok(r) => {
                ok += r.ops_ok;
                races += r.lease_edge_races;
            }
            Err(f) => panic!("{f}"),
        }
    }
    eprintln!("lease edges: {} seeds in {:?}: {ok} ops ok, {races} races played", seeds.len(), started.elapsed());
    if seeds.len() >= 20 {
        assert!(races >= seeds.len(), "the profile must play its race about once a seed or more: {races} races");
    }
}

/// Seeds of each local-read profile in the default run.
const LOCAL_READ_SEEDS: u64 = 150;

/// Lease reads served from the state machine with no call into the engine, whenever
/// `Engine::local_read_end` allows at the node's clock (the lease gate's rule), in the
/// read-race and lease-edge schedules: a gate open too long shows up as a stale read.
#[test]
fn lease_reads_without_the_engine_stay_linearizable_under_read_races_and_lease_edges() {
    let (seeds, steps) = seeds_from_env(LOCAL_READ_SEEDS);
    let started = Instant::now();
    let mut local = 0;
    for base in [SimOptions::read_races(), SimOptions::lease_edges()] {
        let opts = SimOptions { steps, local_reads: true, ..base };
        for seed in &seeds {
            match run(*seed, &opts) {
                Ok(r) => local += r.local_reads,
                Err(f) => panic!("{f}"),
            }
        }
    }
    eprintln!(
        "local reads: {} seeds x 2 profiles in {:?}: {local} served without the engine",
        seeds.len(),
        started.elapsed()
    );
    if seeds.len() >= 50 {
        assert!(local > seeds.len() * 10, "the profiles must serve reads through the gate's rule: {local}");
    }
}
