//! Helpers shared by the runtime's tests: a simulated machine, devices with the verifier off
//! (misuse observed as an error; the verifier tests turn it on), and a gate for threads.

#![allow(dead_code)]

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use dmatx_runtime::{Device, DeviceConfig};
use dmatx_sim::{SimBuffer, SimPlatform};

/// The failure guard of every wait: far beyond anything a passing test needs.
pub const GUARD: Duration = Duration::from_secs(10);

pub fn sim() -> SimPlatform {
    SimPlatform::new()
}

pub fn buffer(sim: &SimPlatform, len: u64) -> SimBuffer {
    sim.allocate_buffer(len, 0).expect("sim memory")
}

/// A device with the verifier off.
pub fn device<X: Send + Sync + 'static>(context: X) -> Device<X> {
    Device::with_config(context, DeviceConfig::default().with_verifier(false))
}

/// A device with the verifier on.
pub fn verified_device<X: Send + Sync + 'static>(context: X) -> Device<X> {
    Device::with_config(context, DeviceConfig::default().with_verifier(true))
}

pub fn assert_clean(sim: &SimPlatform) {
    if let Err(e) = sim.check_clean() {
        panic!("platform not clean at the end of the test: {e}");
    }
}

/// A one-way signal between threads.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    pub fn is_open(&self) -> bool {
        *self.open.lock().unwrap()
    }

    /// Wait until open; panics after the guard time.
    pub fn wait(&self) {
        let deadline = Instant::now() + GUARD;
        let mut open = self.open.lock().unwrap();
        while !*open {
            let now = Instant::now();
            assert!(now < deadline, "gate never opened");
            open = self.cv.wait_timeout(open, deadline - now).unwrap().0;
        }
    }
}

/// Wait until `f` holds, yielding; panics after the guard time.
pub fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}
