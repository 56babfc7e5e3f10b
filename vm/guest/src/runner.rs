//! Runs registered tests one by one: each on its own thread, under a time limit, with a panic
//! counted as that test's failure.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use crate::env::Env;

/// What a test returns: `Ok(())` if it passed, else the reason it failed.
pub type TestResult = Result<(), String>;

/// One named test of the registry.
#[derive(Clone, Copy)]
pub struct Test {
    /// Name printed in the report and matched by the command-line filter, `module.what`
    /// (e.g. `edu.dma_round_trip`).
    pub name: &'static str,
    /// The test itself.
    pub run: fn(&Env) -> TestResult,
}

/// Counts of one run.
pub struct Summary {
    /// Tests that returned `Ok`.
    pub passed: usize,
    /// Tests that returned `Err`, panicked or ran out of time.
    pub failed: usize,
}

/// The message and location of the last panic, recorded by the hook [`run_all`] installs.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Runs `tests` in order, printing `test <name> ... ok (<ms> ms)` or
/// `test <name> ... FAILED: <reason>` for each, and returns the counts.
///
/// A test that panics fails with the panic's message; one that runs longer than
/// [`Env::test_timeout`] fails and is abandoned (its thread keeps running, the next test
/// starts).
pub fn run_all(tests: &[Test], env: Env) -> Summary {
    // Record panics instead of printing them: the report line carries the message.
    panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let text = format!("panicked: {}{location}", payload_text(info.payload()));
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(text);
        }
    }));

    let env = Arc::new(env);
    let mut summary = Summary {
        passed: 0,
        failed: 0,
    };
    for test in tests {
        let started = Instant::now();
        let result = run_one(*test, &env);
        let ms = started.elapsed().as_millis();
        match result {
            Ok(()) => {
                summary.passed += 1;
                println!("test {} ... ok ({ms} ms)", test.name);
            }
            Err(why) => {
                summary.failed += 1;
                println!("test {} ... FAILED: {why} ({ms} ms)", test.name);
            }
        }
    }
    summary
}

/// Runs one test on its own thread and waits for it at most [`Env::test_timeout`].
fn run_one(test: Test, env: &Arc<Env>) -> TestResult {
    let (tx, rx) = mpsc::channel();
    let thread_env = Arc::clone(env);
    let spawned = thread::Builder::new()
        .name(test.name.to_owned())
        .spawn(move || {
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| (test.run)(&thread_env)));
            let result = outcome.unwrap_or_else(|payload| {
                let recorded = LAST_PANIC.lock().ok().and_then(|mut last| last.take());
                Err(recorded.unwrap_or_else(|| format!("panicked: {}", payload_text(&*payload))))
            });
            // The receiver is gone only if the test already timed out; nothing to report then.
            let _ = tx.send(result);
        });
    if let Err(err) = spawned {
        return Err(format!("could not start the test thread: {err}"));
    }
    let limit = env.test_timeout;
    match rx.recv_timeout(limit) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "timed out after {} s (thread abandoned; DMATX_GUEST_TEST_TIMEOUT sets the limit)",
            limit.as_secs_f64()
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err("the test thread ended without a result".to_owned())
        }
    }
}

/// The text of a panic payload (`&str` or `String`), or a note that it is neither.
fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a non-text panic payload)".to_owned()
    }
}

/// A [`Duration`] default for [`Env::test_timeout`].
pub const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(300);
