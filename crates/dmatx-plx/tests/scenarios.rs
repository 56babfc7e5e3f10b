//! The sample scenarios P1–P19 (`samples.md` §4.3): each runs on fresh simulated boards and
//! every observation must match the description (see `dmatx_plx::scenarios`).

use dmatx_plx::scenarios;

/// Run scenario `name`; fail with its report unless every check passed.
fn run(name: &str) {
    let scenario = scenarios::find(name).expect("a known scenario");
    let report = scenario
        .run()
        .unwrap_or_else(|e| panic!("{name} broke down: {e}"));
    assert!(
        report.checks.len() >= 3,
        "{name} made too few checks to mean anything:\n{report}"
    );
    assert!(report.passed(), "{report}");
}

#[test]
fn plx_p01_write_1024_bytes() {
    run("P1");
}

#[test]
fn plx_p02_read_back_1024_bytes() {
    run("P2");
}

#[test]
fn plx_p03_write_20000_bytes_three_transfers() {
    run("P3");
}

#[test]
fn plx_p04_write_128k_at_offset_and_read_back() {
    run("P4");
}

#[test]
fn plx_p05_write_larger_than_sram() {
    run("P5");
}

#[test]
fn plx_p06_single_transfer_toggle() {
    run("P6");
}

#[test]
fn plx_p07_concurrent_write_and_read_coalesced() {
    run("P7");
}

#[test]
fn plx_p08_thread_test() {
    run("P8");
}

#[test]
fn plx_p09_read_stop_after_5000() {
    run("P9");
}

#[test]
fn plx_p10_read_stop_after_0_once_and_persistent() {
    run("P10");
}

#[test]
fn plx_p11_write_stop_after_5000() {
    run("P11");
}

#[test]
fn plx_p12_write_data_abort() {
    run("P12");
}

#[test]
fn plx_p13_stall_cancel_and_power_down() {
    run("P13");
}

#[test]
fn plx_p14_spurious_interrupt() {
    run("P14");
}

#[test]
fn plx_p15_immediate_engine_isr_after_program_dma() {
    run("P15");
}

#[test]
fn plx_p16_thousand_random_round_trips() {
    run("P16");
}

#[test]
fn plx_p17_fragmentation_variant() {
    run("P17");
}

#[test]
fn plx_p18_above_4_gib() {
    run("P18");
}

#[test]
fn plx_p19_power_cycle_and_removal() {
    run("P19");
}
