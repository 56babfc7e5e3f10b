//! Helpers shared by the integration tests: a simulated machine, enablers with the verifier
//! off (so misuse is observed as an error; `verifier.rs` checks the panics), and a program-DMA
//! callback that records what it was given.

#![allow(dead_code)]

pub mod mock;

use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Profile, SgElement,
    Transaction,
};
use dmatx_sim::{Placement, SimBuffer, SimConfig, SimPlatform};
use std::sync::{Arc, Mutex};

/// One program-DMA call as the callback saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programmed {
    pub direction: Direction,
    pub sg: Vec<SgElement>,
    pub current_length: u64,
    pub bytes_transferred: u64,
    pub thread: std::thread::ThreadId,
}

impl Programmed {
    pub fn sg_bytes(&self) -> u64 {
        self.sg.iter().map(|e| u64::from(e.length)).sum()
    }
}

/// The execute context of the tests: a log of program-DMA calls and a marker that the callback
/// is running (to detect nesting).
#[derive(Default, Debug)]
pub struct Log {
    pub calls: Mutex<Vec<Programmed>>,
    pub inside: Mutex<bool>,
    pub nested: Mutex<bool>,
    /// Set by tests that want program-DMA to complete the transfer it was given, and how.
    pub inline: Mutex<Option<Inline>>,
    pub inline_results: Mutex<Vec<Completion>>,
    pub tag: u32,
    /// A handle the callback drops after finishing the transaction inline (statement 72).
    pub keep: Mutex<Option<Arc<Tx>>>,
}

/// What program-DMA does with its transfer when a test asks for inline completion.
#[derive(Clone, Copy, Debug)]
pub enum Inline {
    Full,
    Length(u64),
}

impl Log {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn tagged(tag: u32) -> Arc<Self> {
        Arc::new(Self {
            tag,
            ..Self::default()
        })
    }

    pub fn calls(&self) -> Vec<Programmed> {
        self.calls.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

pub type Tx = Transaction<SimPlatform, Arc<Log>, SimBuffer>;

/// Program-DMA that records its call (and completes inline when the log asks for it).
pub fn record(t: &Tx, log: &Arc<Log>, direction: Direction, sg: &[SgElement]) -> bool {
    {
        let mut inside = log.inside.lock().unwrap();
        if *inside {
            *log.nested.lock().unwrap() = true;
        }
        *inside = true;
    }
    log.calls.lock().unwrap().push(Programmed {
        direction,
        sg: sg.to_vec(),
        current_length: t.current_transfer_length(),
        bytes_transferred: t.bytes_transferred(),
        thread: std::thread::current().id(),
    });
    let inline = *log.inline.lock().unwrap();
    if let Some(how) = inline {
        let r = match how {
            Inline::Full => t.dma_completed(),
            Inline::Length(n) => t.dma_completed_with_length(n),
        };
        let r = r.expect("inline completion is not misuse");
        log.inline_results.lock().unwrap().push(r);
        if r.is_finished()
            && let Some(handle) = log.keep.lock().unwrap().take()
        {
            // Release and drop what may be the last handle from inside program-DMA.
            let buffer = handle.release().expect("release after finishing");
            drop(buffer);
            drop(handle);
        }
    }
    *log.inside.lock().unwrap() = false;
    true
}

/// A simulated machine whose adapters get `n` map registers, mapping directly, with scattered
/// pages.
pub fn sim(n: u32) -> SimPlatform {
    SimConfig::new()
        .map_registers(n)
        .build()
        .expect("sim platform")
}

/// `len` bytes starting `page_offset` bytes into the first page, pages scattered.
pub fn buffer(sim: &SimPlatform, len: u64, page_offset: u64) -> SimBuffer {
    sim.allocate_buffer(len, page_offset).expect("sim memory")
}

/// `len` bytes on physically consecutive pages.
pub fn contiguous(sim: &SimPlatform, len: u64, page_offset: u64) -> SimBuffer {
    sim.allocate_buffer_with(len, page_offset, Placement::Contiguous)
        .expect("sim memory")
}

/// An enabler with the verifier off.
pub fn enabler(
    sim: &SimPlatform,
    profile: Profile,
    max: u64,
    v: DmaVersion,
) -> Enabler<SimPlatform> {
    let config = EnablerConfig::new(profile, max)
        .with_version(v)
        .with_verifier(false);
    Enabler::create(&DmaDevice::new(sim.clone()), config).expect("enabler")
}

/// Report every transfer done in full until the transaction finishes; the number of
/// completions made and the final status.
pub fn run_to_end(t: &Tx) -> (usize, dmatx::Result<()>) {
    let mut n = 0;
    loop {
        n += 1;
        match t.dma_completed().expect("completion is not misuse") {
            Completion::Finished(status) => return (n, status),
            Completion::MoreProcessingRequired => {}
        }
    }
}

/// Assert the platform is back to rest: pools full, nothing queued or mapped, sanitizer quiet.
pub fn assert_clean(sim: &SimPlatform) {
    if let Err(e) = sim.check_clean() {
        panic!("platform not clean at the end of the test: {e}");
    }
}
