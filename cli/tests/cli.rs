//! The `dmatx` binary's `trace render` and `bench` subcommands, run as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dmatx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmatx"))
        .args(args)
        .output()
        .expect("the dmatx binary runs")
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dmatx-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn render_refuses_a_malformed_trace_and_writes_nothing() {
    let dir = scratch("malformed");
    let cases = [
        ("not-json.json", "{\"traceEvents\": [", "not JSON"),
        ("no-events.json", "{\"events\": []}", "no \"traceEvents\""),
        (
            "no-ts.json",
            "[{\"ph\": \"i\", \"name\": \"x\"}]",
            "no \"ts\"",
        ),
        (
            "open.json",
            "[{\"ph\": \"b\", \"cat\": \"request\", \"id\": 1, \"ts\": 0}]",
            "has no end",
        ),
    ];
    for (name, text, says) in cases {
        let input = dir.join(name);
        std::fs::write(&input, text).unwrap();
        let svg = dir.join(format!("{name}.svg"));
        let out = dmatx(&[
            "trace",
            "render",
            input.to_str().unwrap(),
            svg.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{name}: accepted");
        let message = stderr(&out);
        assert!(message.starts_with("dmatx: "), "{name}: {message}");
        assert!(
            message.contains(name) && message.contains(says),
            "{name}: {message}"
        );
        assert_eq!(message.trim_end().lines().count(), 1, "{name}: {message}");
        assert!(!svg.exists(), "{name}: an SVG was left behind");
    }
    // Nothing but the inputs: no temporary files either.
    assert_eq!(entries(&dir).len(), cases.len());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn render_reports_a_missing_input_and_an_unwritable_output() {
    let dir = scratch("paths");
    let out = dmatx(&[
        "trace",
        "render",
        "/nonexistent/t.json",
        dir.join("t.svg").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot read /nonexistent/t.json"),
        "{}",
        stderr(&out)
    );

    let input = dir.join("t.json");
    std::fs::write(&input, "{\"traceEvents\": []}").unwrap();
    let out = dmatx(&[
        "trace",
        "render",
        input.to_str().unwrap(),
        "/nonexistent/t.svg",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot write /nonexistent/t.svg"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn render_draws_a_valid_trace() {
    let dir = scratch("valid");
    let input = dir.join("run.json");
    let trace = r#"{"traceEvents": [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "main"}},
        {"ph": "b", "cat": "request", "id": 1, "name": "write 1", "ts": 0, "pid": 1, "tid": 1},
        {"ph": "X", "name": "tx.program_dma", "ts": 1, "dur": 2, "pid": 1, "tid": 1, "args": {"tx": 1, "transfer": 0}},
        {"ph": "i", "name": "hal.map", "s": "t", "ts": 1.5, "pid": 1, "tid": 1},
        {"ph": "e", "cat": "request", "id": 1, "name": "write 1", "ts": 10, "pid": 1, "tid": 1}
    ], "displayTimeUnit": "ns"}"#;
    std::fs::write(&input, trace).unwrap();
    let svg = dir.join("run.svg");
    let out = dmatx(&[
        "trace",
        "render",
        input.to_str().unwrap(),
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(text.contains("run.json — 5 events"));
    assert!(text.contains(">program_dma<") && text.contains(">requests (1 slice)<"));
    assert_eq!(entries(&dir), ["run.json", "run.svg"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_quick_prints_a_table_and_writes_a_plot() {
    let dir = scratch("bench");
    let plot = dir.join("bench.svg");
    let out = dmatx(&[
        "bench",
        "--quick",
        "--sizes",
        "4K,64K",
        "--time-ms",
        "5",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "4 KiB",
        "64 KiB",
        "MB/s",
        "reproduce: cargo run --release --bin dmatx -- bench",
        "plot written to",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in\n{stdout}");
    }
    let text = std::fs::read_to_string(&plot).unwrap();
    assert!(text.starts_with("<svg") && text.contains("<polyline"));
    assert!(text.contains("scatter/gather, bounce buffers"));
    assert_eq!(entries(&dir), ["bench.svg"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_refuses_bad_options_before_running() {
    for (args, says) in [
        (&["bench", "--sizes", "0"][..], "--sizes: 0 is out of range"),
        (&["bench", "--sizes", "4Q"][..], "not a size"),
        (
            &["bench", "--series", "nope"][..],
            "unknown series \"nope\"",
        ),
        (&["bench", "--rounds", "0"][..], "--rounds 0"),
        (
            &["bench", "--plot", "/nonexistent/p.svg"][..],
            "cannot write /nonexistent/p.svg",
        ),
    ] {
        let out = dmatx(args);
        assert!(!out.status.success(), "{args:?} accepted");
        let message = stderr(&out);
        assert!(
            message.starts_with("dmatx: ") && message.contains(says),
            "{args:?}: {message}"
        );
        assert_eq!(message.trim_end().lines().count(), 1, "{message}");
        assert!(out.stdout.is_empty(), "{args:?} started running");
    }
}

#[test]
fn every_command_and_option_has_help() {
    for args in [
        &["--help"][..],
        &["trace", "render", "--help"],
        &["bench", "--help"],
        &["demo", "--help"],
        &["scenario", "--help"],
    ] {
        let out = dmatx(args);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        // Every option line carries a description after its name.
        for line in help.lines().filter(|l| l.trim_start().starts_with("--")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(words.len() >= 3, "{args:?}: bare option {line:?}");
        }
    }
    let help = String::from_utf8_lossy(&dmatx(&["--help"]).stdout).into_owned();
    assert!(
        help.contains("trace")
            && help.contains("bench")
            && help.contains("demo")
            && help.contains("scenario")
    );
}
