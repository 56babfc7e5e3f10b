//! Conformance: the DMA enabler (spec §1.1, §2.1; statements 1–12).

mod common;

use common::{assert_clean, sim};
use dmatx::{
    Direction, DmaDevice, DmaVersion, Enabler, EnablerConfig, Error, PAGE_SIZE, Profile,
    RawEnablerConfig, UNLIMITED_FRAGMENTS,
};

fn create(config: EnablerConfig) -> Result<(), Error> {
    let sim = sim(16);
    let r = Enabler::create(&DmaDevice::new(sim.clone()), config).map(drop);
    assert_clean(&sim);
    r
}

#[test]
fn stmt_001_zero_maximum_length_is_invalid() {
    assert_eq!(
        create(EnablerConfig::new(Profile::Packet, 0)),
        Err(Error::InvalidParameter)
    );
    let raw = RawEnablerConfig::new(1, 0);
    let config = EnablerConfig::from_raw(&raw).unwrap();
    assert_eq!(create(config), Err(Error::InvalidParameter));
}

#[test]
fn stmt_001_dmatx_rejects_maximum_length_above_32_bits() {
    // KMDF truncates silently (docs/quirks.md).
    assert_eq!(
        create(EnablerConfig::new(Profile::ScatterGather64, 1 << 32)),
        Err(Error::InvalidParameter)
    );
    assert_eq!(
        create(EnablerConfig::new(Profile::ScatterGather64, u64::MAX)),
        Err(Error::InvalidParameter)
    );
    assert_eq!(
        create(EnablerConfig::new(
            Profile::ScatterGather64,
            u64::from(u32::MAX)
        )),
        Ok(())
    );
}

#[test]
fn stmt_002_profile_zero_or_above_eight_is_invalid() {
    for raw in [0, 9, 100, u32::MAX] {
        assert_eq!(
            EnablerConfig::from_raw(&RawEnablerConfig::new(raw, 4096)),
            Err(Error::InvalidParameter),
            "profile {raw}"
        );
    }
    for raw in 1..=8 {
        let config = EnablerConfig::from_raw(&RawEnablerConfig::new(raw, 4096)).unwrap();
        assert_eq!(config.profile.raw(), raw);
    }
}

#[test]
fn stmt_003_config_size_mismatch() {
    for size in [0, RawEnablerConfig::SIZE - 8, RawEnablerConfig::SIZE + 1] {
        let raw = RawEnablerConfig {
            size,
            ..RawEnablerConfig::new(2, 4096)
        };
        assert_eq!(
            EnablerConfig::from_raw(&raw),
            Err(Error::InfoLengthMismatch)
        );
    }
}

#[test]
fn stmt_004_system_profile_with_address_width_override_fails() {
    for p in [Profile::System, Profile::SystemDuplex] {
        assert_eq!(
            create(EnablerConfig::new(p, 4096).with_address_width(32)),
            Err(Error::InvalidParameter)
        );
    }
}

#[test]
fn stmt_005_32_bit_profile_with_width_40_fails() {
    for p in [
        Profile::Packet,
        Profile::ScatterGather,
        Profile::ScatterGatherDuplex,
    ] {
        assert_eq!(
            create(EnablerConfig::new(p, 4096).with_address_width(40)),
            Err(Error::InvalidParameter),
            "{p:?}"
        );
        // A narrower override is accepted and selects v3.
        let sim = sim(16);
        let e = Enabler::create(
            &DmaDevice::new(sim.clone()),
            EnablerConfig::new(p, 4096).with_address_width(28),
        )
        .unwrap();
        assert_eq!((e.version(), e.address_bits()), (DmaVersion::V3, 28));
    }
    // dmatx also rejects widths outside 24..=64 (docs/quirks.md).
    assert_eq!(
        create(EnablerConfig::new(Profile::Packet64, 4096).with_address_width(20)),
        Err(Error::InvalidParameter)
    );
    assert_eq!(
        create(EnablerConfig::new(Profile::Packet64, 4096).with_address_width(65)),
        Err(Error::InvalidParameter)
    );
}

#[test]
fn stmt_006_version_2_override_on_system_profile_fails() {
    assert_eq!(
        create(EnablerConfig::new(Profile::System, 4096).with_version(DmaVersion::V2)),
        Err(Error::InvalidParameter)
    );
    // A width override forces v3, so v2 on top of it is refused too.
    assert_eq!(
        create(
            EnablerConfig::new(Profile::Packet64, 4096)
                .with_address_width(48)
                .with_version(DmaVersion::V2)
        ),
        Err(Error::InvalidParameter)
    );
}

#[test]
fn stmt_007_single_transfer_requirement_needs_v3() {
    let mut config =
        EnablerConfig::new(Profile::ScatterGather64, 4096).with_version(DmaVersion::V2);
    config.require_single_transfer = true;
    assert_eq!(create(config), Err(Error::InvalidParameter));
    config.version_override = Some(DmaVersion::V3);
    assert_eq!(create(config), Ok(()));
}

#[test]
fn stmt_008_fragment_length_is_min_of_maximum_and_n_minus_one_pages() {
    for n in [2u32, 3, 17, 64] {
        for max in [1u64, 4096, 10_000, 64 * 1024, 1 << 20] {
            let sim = sim(n);
            let e = Enabler::create(
                &DmaDevice::new(sim.clone()),
                EnablerConfig::new(Profile::ScatterGather64Duplex, max),
            )
            .unwrap();
            for d in Direction::ALL {
                assert_eq!(e.map_register_count(d), n);
                assert_eq!(
                    e.fragment_length(d),
                    max.min(u64::from(n - 1) * PAGE_SIZE),
                    "n {n} max {max}"
                );
            }
            assert_eq!(e.maximum_length(), max);
        }
    }
}

#[test]
fn stmt_008_platform_granting_fewer_than_two_registers_fails() {
    let sim = sim(1);
    let r = Enabler::create(
        &DmaDevice::new(sim.clone()),
        EnablerConfig::new(Profile::Packet, 4096),
    );
    assert_eq!(r.err(), Some(Error::Unsuccessful));
}

#[test]
fn stmt_009_max_sg_elements_starts_unlimited() {
    let sim = sim(8);
    let e = Enabler::create(
        &DmaDevice::new(sim.clone()),
        EnablerConfig::new(Profile::ScatterGather, 4096),
    )
    .unwrap();
    assert_eq!(e.max_sg_elements(), UNLIMITED_FRAGMENTS);
    assert_eq!(UNLIMITED_FRAGMENTS, 0xFFFF_FFFF);
}

#[test]
fn stmt_010_setting_zero_max_sg_elements_keeps_previous_value() {
    let sim = sim(8);
    let e = Enabler::create(
        &DmaDevice::new(sim.clone()),
        EnablerConfig::new(Profile::ScatterGather, 4096),
    )
    .unwrap();
    e.set_max_sg_elements(17).unwrap();
    assert_eq!(e.set_max_sg_elements(0), Err(Error::InvalidParameter));
    assert_eq!(e.max_sg_elements(), 17);
    // Values above 32 bits clamp to unlimited.
    e.set_max_sg_elements(1 << 40).unwrap();
    assert_eq!(e.max_sg_elements(), UNLIMITED_FRAGMENTS);
}

#[test]
fn stmt_011_invalid_direction_is_unrepresentable_and_raw_values_are_rejected() {
    // dmatx's Direction cannot be invalid; raw values are checked where they enter.
    assert_eq!(Direction::from_raw(2), Err(Error::InvalidParameter));
    assert_eq!(Direction::from_raw(u32::MAX), Err(Error::InvalidParameter));
    // A direction with no adapter (an unconfigured system enabler) answers 0 / None.
    let sim = sim(8);
    let e = Enabler::create(
        &DmaDevice::new(sim.clone()),
        EnablerConfig::new(Profile::System, 4096),
    )
    .unwrap();
    for d in Direction::ALL {
        assert_eq!(e.fragment_length(d), 0);
        assert!(e.adapter(d).is_none());
    }
}

#[test]
fn stmt_012_simplex_shares_one_adapter_duplex_has_two() {
    let sim = sim(8);
    let device = DmaDevice::new(sim.clone());
    for p in [
        Profile::Packet,
        Profile::ScatterGather,
        Profile::Packet64,
        Profile::ScatterGather64,
    ] {
        let e = Enabler::create(&device, EnablerConfig::new(p, 4096)).unwrap();
        let (r, w) = (
            e.adapter(Direction::ReadFromDevice).unwrap(),
            e.adapter(Direction::WriteToDevice).unwrap(),
        );
        assert!(std::ptr::eq(r, w), "{p:?}");
        assert_eq!(r.id(), w.id());
    }
    for p in [Profile::ScatterGatherDuplex, Profile::ScatterGather64Duplex] {
        let e = Enabler::create(&device, EnablerConfig::new(p, 4096)).unwrap();
        let (r, w) = (
            e.adapter(Direction::ReadFromDevice).unwrap(),
            e.adapter(Direction::WriteToDevice).unwrap(),
        );
        assert!(!std::ptr::eq(r, w), "{p:?}");
        assert_ne!(r.id(), w.id());
    }
    assert_clean(&sim);
}

#[test]
fn version_selection_follows_kmdf() {
    let sim = sim(8);
    let device = DmaDevice::new(sim.clone());
    let default = if cfg!(any(target_arch = "arm", target_arch = "aarch64")) {
        DmaVersion::V3
    } else {
        DmaVersion::V2
    };
    let e = Enabler::create(&device, EnablerConfig::new(Profile::Packet, 4096)).unwrap();
    assert_eq!(e.version(), default);
    let e = Enabler::create(&device, EnablerConfig::new(Profile::System, 4096)).unwrap();
    assert_eq!(e.version(), DmaVersion::V3, "system profiles force v3");
    let e = Enabler::create(
        &device,
        EnablerConfig::new(Profile::Packet, 4096).with_version(DmaVersion::V3),
    )
    .unwrap();
    assert_eq!(e.version(), DmaVersion::V3);
    assert_eq!(e.address_bits(), 32);
    let e = Enabler::create(&device, EnablerConfig::new(Profile::Packet64, 4096)).unwrap();
    assert_eq!(e.address_bits(), 64);
}
