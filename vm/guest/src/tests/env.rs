//! The guest itself: VFIO is there and every test device is bound to `vfio-pci` in an IOMMU
//! group whose device node exists.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::env::{EDU_ID, Env, NVME_ID};
use crate::runner::{Test, TestResult};

/// The environment checks.
pub const TESTS: &[Test] = &[
    Test {
        name: "env.vfio_present",
        run: vfio_present,
    },
    Test {
        name: "env.init_setup",
        run: init_setup,
    },
    Test {
        name: "env.devices_bound",
        run: devices_bound,
    },
];

/// `/dev/vfio/vfio`, the VFIO container node, exists and is a character device.
fn vfio_present(_env: &Env) -> TestResult {
    char_device(Path::new("/dev/vfio/vfio"))
        .map_err(|why| format!("{why} (vfio module not loaded, or not inside the test guest?)"))
}

/// The guest's init loaded every VFIO module and bound every test device without an error.
fn init_setup(env: &Env) -> TestResult {
    match env.init_errors {
        Some(0) => Ok(()),
        Some(n) => Err(format!(
            "the guest init reported {n} module or bind failure(s); see its `init:` lines"
        )),
        None => Err("DMATX_INIT_ERRORS is not set: not started by vm/guest-init.sh".to_owned()),
    }
}

/// Every edu and nvme device is bound to `vfio-pci` and has an IOMMU group whose
/// `/dev/vfio/<group>` node exists.
fn devices_bound(env: &Env) -> TestResult {
    if env.devices().next().is_none() {
        return Err(format!(
            "{}; {}",
            env.none_found("edu", EDU_ID),
            env.none_found("nvme", NVME_ID)
        ));
    }
    let mut problems = Vec::new();
    for device in env.devices() {
        let check = || -> TestResult {
            match device.driver()? {
                Some(driver) if driver == "vfio-pci" => {}
                Some(driver) => return Err(format!("bound to {driver}, not vfio-pci")),
                None => return Err("bound to no driver".to_owned()),
            }
            let group = device
                .iommu_group()?
                .ok_or("in no IOMMU group (IOMMU off?)")?;
            char_device(&Path::new("/dev/vfio").join(&group))
        };
        if let Err(why) = check() {
            problems.push(format!("{}: {why}", device.address));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// `Ok` if `path` is a character device, else why not.
fn char_device(path: &Path) -> TestResult {
    match fs::metadata(path) {
        Ok(meta) if meta.file_type().is_char_device() => Ok(()),
        Ok(_) => Err(format!("{} is not a character device", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
