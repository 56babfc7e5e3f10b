//! Conformance: common buffers (spec §1.3, §2.7; statements 101–105).

mod common;

use common::{assert_clean, sim};
use dmatx::{
    CommonBuffer, CommonBufferConfig, DmaDevice, Enabler, EnablerConfig, Error, PAGE_SIZE, Profile,
    RawCommonBufferConfig,
};

fn enabler(sim: &dmatx_sim::SimPlatform, profile: Profile) -> Enabler<dmatx_sim::SimPlatform> {
    Enabler::create(
        &DmaDevice::new(sim.clone()),
        EnablerConfig::new(profile, 8192),
    )
    .unwrap()
}

#[test]
fn stmt_101_zero_length_is_invalid() {
    let sim = sim(8);
    let e = enabler(&sim, Profile::ScatterGather64);
    assert_eq!(
        CommonBuffer::create(&e, 0).err(),
        Some(Error::InvalidParameter)
    );
    assert_eq!(
        CommonBuffer::create(&e, 1 << 32).err(),
        Some(Error::InsufficientResources)
    );
    assert_clean(&sim);
}

#[test]
fn stmt_102_small_alignment_keeps_raw_addresses() {
    let sim = sim(8);
    for profile in [Profile::Packet, Profile::ScatterGather64] {
        let e = enabler(&sim, profile);
        for mask in [0u64, 1, 15, 63, 4095] {
            let cb = CommonBuffer::create_with_config(
                &e,
                777,
                CommonBufferConfig {
                    alignment_requirement: Some(mask),
                },
            )
            .unwrap();
            let raw = cb.raw_allocation();
            assert!(cb.aligned_logical_address().is_aligned(mask));
            assert!(cb.aligned_virtual_address().is_aligned(mask));
            assert_eq!(cb.aligned_logical_address(), raw.logical);
            assert_eq!(cb.aligned_virtual_address(), raw.virt);
            assert_eq!(raw.length, 777, "no padding when the mask is within a page");
        }
    }
    assert_clean(&sim);
}

#[test]
fn stmt_103_large_alignment_keeps_both_views_on_the_same_byte() {
    let sim = sim(8);
    let e = enabler(&sim, Profile::ScatterGather64);
    for mask in [PAGE_SIZE * 2 - 1, 0xffff, 0x3_ffff] {
        let cb = CommonBuffer::create_with_config(
            &e,
            5000,
            CommonBufferConfig {
                alignment_requirement: Some(mask),
            },
        )
        .unwrap();
        let raw = cb.raw_allocation();
        assert!(cb.aligned_logical_address().is_aligned(mask));
        let la_skew = cb
            .aligned_logical_address()
            .offset_from(raw.logical)
            .unwrap();
        let va_skew = cb.aligned_virtual_address().offset_from(raw.virt).unwrap();
        assert_eq!(la_skew, va_skew);
        assert_eq!(raw.length, 5000 + mask);
        // The bytes written at the aligned start are where the device sees them.
        cb.write(0, &[0xA5; 16]).unwrap();
        let mut back = [0u8; 16];
        cb.read(0, &mut back).unwrap();
        assert_eq!(back, [0xA5; 16]);
    }
    assert_clean(&sim);
}

#[test]
fn stmt_104_length_is_the_requested_one() {
    let sim = sim(8);
    let e = enabler(&sim, Profile::ScatterGather64);
    let cb = CommonBuffer::create_with_config(
        &e,
        1234,
        CommonBufferConfig {
            alignment_requirement: Some(0xffff),
        },
    )
    .unwrap();
    assert_eq!(cb.length(), 1234);
    // Access is bounded by the requested length, not the padded one.
    assert_eq!(cb.write(1234, &[1]), Err(Error::InvalidParameter));
    assert_eq!(cb.read(1200, &mut [0; 35]), Err(Error::InvalidParameter));
    assert_eq!(cb.read(u64::MAX, &mut [0; 2]), Err(Error::InvalidParameter));
    drop(cb);
    assert_clean(&sim);
}

#[test]
fn stmt_105_config_size_mismatch() {
    let raw = RawCommonBufferConfig {
        size: 8,
        alignment_requirement: 15,
    };
    assert_eq!(
        CommonBufferConfig::from_raw(&raw),
        Err(Error::InfoLengthMismatch)
    );
    let raw = RawCommonBufferConfig {
        size: RawCommonBufferConfig::SIZE,
        alignment_requirement: 15,
    };
    assert_eq!(
        CommonBufferConfig::from_raw(&raw)
            .unwrap()
            .alignment_requirement,
        Some(15)
    );
}

#[test]
fn alignment_that_is_not_a_mask_is_invalid() {
    let sim = sim(8);
    let e = enabler(&sim, Profile::ScatterGather64);
    let r = CommonBuffer::create_with_config(
        &e,
        100,
        CommonBufferConfig {
            alignment_requirement: Some(10),
        },
    );
    assert_eq!(r.err(), Some(Error::InvalidParameter));
    let r = CommonBuffer::create_with_config(
        &e,
        100,
        CommonBufferConfig {
            alignment_requirement: Some(u64::MAX),
        },
    );
    assert_eq!(r.err(), Some(Error::InvalidParameter));
    assert_clean(&sim);
}

#[test]
fn packet_enablers_get_the_platform_alignment_by_default() {
    // KMDF computes the default alignment only for SG profiles (docs/quirks.md, entry 8).
    let sim = dmatx_sim::SimConfig::new()
        .adapter(dmatx_sim::AdapterConfig::default().alignment_requirement(0x3fff))
        .build()
        .unwrap();
    for profile in [Profile::Packet, Profile::ScatterGather64] {
        let e = enabler(&sim, profile);
        let cb = CommonBuffer::create(&e, 100).unwrap();
        assert!(
            cb.aligned_logical_address().is_aligned(0xfff),
            "{profile:?}"
        );
    }
    assert_clean(&sim);
}
