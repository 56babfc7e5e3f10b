//! The registry of guest tests.
//!
//! Each module holds the tests of one subject and lists them in its `TESTS` table; [`all`]
//! joins the tables in the order they run. To add a test, write a function
//! `fn(&Env) -> TestResult` in the module it belongs to (or in a new module declared here and
//! added to [`all`]) and list it in that module's table:
//!
//! ```ignore
//! pub const TESTS: &[Test] = &[
//!     Test { name: "edu.present", run: present },
//!     Test { name: "edu.dma_round_trip", run: dma_round_trip },
//! ];
//!
//! fn dma_round_trip(env: &Env) -> TestResult {
//!     let edu = env.edu.first().ok_or_else(|| env.none_found("edu", EDU_ID))?;
//!     // ... Err(format!("...")) on a mismatch; a panic also counts as a failure.
//!     Ok(())
//! }
//! ```
//!
//! Names are `module.what`; the command-line filter matches any part of them, so
//! `dmatx-guest edu.` runs one module's tests.

pub mod edu;
pub mod env;
pub mod nvme;

use crate::runner::Test;

/// Every registered test, in running order: the environment checks first, then each device.
pub fn all() -> Vec<Test> {
    [env::TESTS, edu::TESTS, nvme::TESTS].concat()
}

#[cfg(test)]
mod unit {
    use super::all;

    #[test]
    fn names_are_unique_and_qualified() {
        let tests = all();
        let mut names: Vec<&str> = tests.iter().map(|t| t.name).collect();
        assert!(names.iter().all(|n| n.contains('.')), "{names:?}");
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), tests.len(), "duplicate test names");
    }
}
