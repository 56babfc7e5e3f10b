//! Property tests: random buffer layouts, lengths, limits, mapping modes and partial transfers,
//! run end to end through a simulated DMA device, against a plain reference model.
//!
//! Properties: every transfer stays within every limit (F, the SG element limit, one element
//! for packet transfers, the map registers); the bytes arrive intact and in order, through
//! direct, IOMMU and bounce mapping, in both directions; the bytes reported equal the length; a
//! transaction is refused as too fragmented only when the reference model says a chunk needs
//! more pages than allowed; the platform's pools come back full and the sanitizer stays quiet.

mod common;

use dmatx::hal::MemoryDescriptor;
use dmatx::{
    Completion, Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Error, PAGE_SIZE,
    Profile, SgElement, Transaction,
};
use dmatx_sim::{
    AdapterMode, CompletionMode, DeviceCompletion, DeviceConfig, DeviceFault, Placement, SimBuffer,
    SimConfig, SimDmaDevice, SimPlatform,
};
use proptest::prelude::*;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

const HIGH_MEMORY: u64 = 0x1_0000_0000;

struct Rig {
    device: SimDmaDevice,
    /// (current length, SG elements, sum of element lengths) per program-DMA call.
    seen: Mutex<Vec<(u64, usize, u64)>>,
}

type Tx = Transaction<SimPlatform, Arc<Rig>, SimBuffer>;

fn program(t: &Tx, rig: &Arc<Rig>, direction: Direction, sg: &[SgElement]) -> bool {
    let bytes = sg.iter().map(|e| u64::from(e.length)).sum();
    rig.seen
        .lock()
        .unwrap()
        .push((t.current_transfer_length(), sg.len(), bytes));
    // The device offset mirrors the buffer position: data lands where it belongs.
    rig.device.start(direction, sg, t.bytes_transferred());
    true
}

fn pattern(i: u64, salt: u8) -> u8 {
    (i.wrapping_mul(0x9E37_79B9) >> 13) as u8 ^ salt
}

/// Reference model of the SG pre-check: pages per chunk of F, counted per segment.
fn model_too_fragmented(parts: &[(u64, u64)], offset: u64, length: u64, f: u64, max: u64) -> bool {
    let pages = |mut from: u64, len: u64| {
        let (mut left, mut n) = (len, 0);
        for &(seg_len, page_offset) in parts {
            if left == 0 {
                break;
            }
            if from >= seg_len {
                from -= seg_len;
                continue;
            }
            let take = (seg_len - from).min(left);
            let first = (page_offset + from) / PAGE_SIZE;
            let last = (page_offset + from + take - 1) / PAGE_SIZE;
            n += last - first + 1;
            left -= take;
            from = 0;
        }
        n
    };
    let mut done = 0;
    while done < length {
        let chunk = (length - done).min(f);
        if pages(offset + done, chunk) > max {
            return true;
        }
        done += chunk;
    }
    false
}

#[derive(Debug, Clone)]
struct Case {
    profile: Profile,
    mode: AdapterMode,
    direction: Direction,
    parts: Vec<(u64, u64)>,
    offset_pick: u64,
    length_pick: u64,
    registers: u32,
    maximum_length: u64,
    max_sg: Option<u64>,
    partials: Vec<(u64, u64)>,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            Just(Profile::Packet),
            Just(Profile::ScatterGather),
            Just(Profile::Packet64),
            Just(Profile::ScatterGather64)
        ],
        prop_oneof![
            Just(AdapterMode::Direct),
            Just(AdapterMode::Iommu),
            Just(AdapterMode::Bounce)
        ],
        prop_oneof![
            Just(Direction::ReadFromDevice),
            Just(Direction::WriteToDevice)
        ],
        prop::collection::vec((1u64..40_000, 0u64..PAGE_SIZE), 1..4),
        any::<u64>(),
        any::<u64>(),
        2u32..20,
        1u64..70_000,
        prop::option::of(1u64..12),
        prop::collection::vec((0u64..12, 0u64..5000), 0..4),
    )
        .prop_map(
            |(
                profile,
                mode,
                direction,
                parts,
                offset_pick,
                length_pick,
                registers,
                maximum_length,
                max_sg,
                partials,
            )| Case {
                profile,
                mode,
                direction,
                parts,
                offset_pick,
                length_pick,
                registers,
                maximum_length,
                max_sg,
                partials,
            },
        )
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    // Buffers live in high memory; 32-bit profiles then need bounce pages or the IOMMU, and a
    // direct 32-bit adapter cannot reach them at all, so keep buffers low there.
    let narrow = case.profile.address_bits() == Some(32);
    let placement = if narrow && case.mode == AdapterMode::Direct {
        Placement::Below(dmatx::PhysAddr::new(HIGH_MEMORY))
    } else {
        Placement::Above(dmatx::PhysAddr::new(HIGH_MEMORY))
    };
    let sim = SimConfig::new()
        .add_region(HIGH_MEMORY, 16 << 20)
        .map_registers(case.registers)
        .mode(case.mode)
        .build()
        .unwrap();
    let parts: Vec<SimBuffer> = case
        .parts
        .iter()
        .map(|&(len, off)| sim.allocate_buffer_with(len, off, placement).unwrap())
        .collect();
    let mut buffer = SimBuffer::chain(parts).unwrap();
    let total = buffer.len();
    let first_len = buffer.segment(0).length;
    let offset = case.offset_pick % first_len;
    let length = 1 + case.length_pick % (total - offset);

    let config = EnablerConfig::new(case.profile, case.maximum_length)
        .with_version(DmaVersion::V3)
        .with_verifier(false);
    let enabler = Enabler::create(&DmaDevice::new(sim.clone()), config).unwrap();
    if let Some(max) = case.max_sg {
        enabler.set_max_sg_elements(max).unwrap();
    }
    let adapter = enabler.adapter(case.direction).unwrap().clone();
    let device = SimDmaDevice::new(
        &adapter,
        DeviceConfig::default()
            .storage_bytes(total as usize)
            .mode(CompletionMode::Manual),
    );
    let completions: Arc<Mutex<VecDeque<DeviceCompletion>>> = Arc::default();
    let sink = Arc::clone(&completions);
    device.set_completion_handler(move |c| sink.lock().unwrap().push_back(c));
    for &(transfer, bytes) in &case.partials {
        device.inject(transfer, DeviceFault::Partial(bytes));
    }

    // Data: the source holds the pattern, the destination zeros.
    let salt = case.registers as u8;
    let source: Vec<u8> = (0..length).map(|i| pattern(i, salt)).collect();
    match case.direction {
        Direction::WriteToDevice => buffer.write(offset, &source).unwrap(),
        Direction::ReadFromDevice => device.write_storage(0, &source).unwrap(),
    }

    let rig = Arc::new(Rig {
        device,
        seen: Mutex::default(),
    });
    let t = Tx::create(&enabler).unwrap();
    let f = enabler.fragment_length(case.direction);
    let max_sg = case.max_sg.unwrap_or(u64::from(u32::MAX));
    let expect_fragmented = case.profile.is_scatter_gather()
        && model_too_fragmented(&case.parts, offset, length, f, max_sg);
    if let Err(e) = t.initialize_using_offset(program, case.direction, buffer, offset, length) {
        prop_assert_eq!(e.error, Error::WdfTooFragmented);
        prop_assert!(expect_fragmented, "refused though the model accepts");
        drop(e);
        prop_assert_eq!(sim.check_clean(), Ok(()));
        return Ok(());
    }
    prop_assert!(!expect_fragmented, "accepted though the model refuses");

    t.execute(Arc::clone(&rig)).unwrap();
    let mut steps = 0;
    let status = loop {
        steps += 1;
        prop_assert!(steps < 100_000, "no progress");
        prop_assert!(rig.device.step(), "a programmed transfer must be pending");
        let c = completions.lock().unwrap().pop_front().unwrap();
        prop_assert_eq!(c.result, Ok(()));
        match t.dma_completed_with_length(c.bytes).unwrap() {
            Completion::Finished(status) => break status,
            Completion::MoreProcessingRequired => {}
        }
    };

    let seen = rig.seen.lock().unwrap().clone();
    for &(current, elements, bytes) in &seen {
        prop_assert!(current > 0 && current <= f);
        prop_assert_eq!(bytes, current);
        if case.profile.is_scatter_gather() {
            prop_assert!(elements as u64 <= max_sg);
            prop_assert!(elements <= case.registers as usize);
        } else {
            prop_assert_eq!(elements, 1);
        }
    }
    if let Err(e) = status {
        // Partial completions can move chunk boundaries so a later chunk needs more pages
        // than the pre-check saw (statement 67).
        prop_assert_eq!(e, Error::WdfTooFragmented);
        prop_assert!(case.max_sg.is_some() && !case.partials.is_empty());
    } else {
        prop_assert_eq!(t.bytes_transferred(), length);
    }
    let done = t.bytes_transferred() as usize;
    let buffer = t.release().unwrap().unwrap();
    let mut moved = vec![0u8; done];
    match case.direction {
        Direction::WriteToDevice => rig.device.read_storage(0, &mut moved).unwrap(),
        Direction::ReadFromDevice => buffer.read(offset, &mut moved).unwrap(),
    }
    prop_assert!(moved == source[..done], "data corrupted");
    if case.mode == AdapterMode::Bounce && narrow && case.direction == Direction::WriteToDevice {
        prop_assert!(sim.stats().bytes_bounced() >= length);
    }
    drop((t, buffer));
    prop_assert_eq!(sim.check_clean(), Ok(()));
    prop_assert_eq!(sim.check_memory_returned(), Ok(()));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn transfers_cover_the_buffer_within_limits_and_data_arrives(case in cases()) {
        run(&case)?;
    }
}
