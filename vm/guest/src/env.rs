//! What the tests run against: the PCI devices found in sysfs and the settings from the
//! environment.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runner::DEFAULT_TEST_TIMEOUT;

/// Where Linux lists the PCI devices.
const PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// A PCI (vendor, device) ID pair.
pub type PciId = (u16, u16);

/// PCI vendor and device ID of QEMU's `edu` device.
pub const EDU_ID: PciId = (0x1234, 0x11e8);

/// PCI vendor and device ID of QEMU's `nvme` device.
pub const NVME_ID: PciId = (0x1b36, 0x0010);

/// Size of the edu device's DMA buffer, the largest transfer it takes.
pub const EDU_BUFFER_SIZE: usize = 4096;

/// One PCI function found in sysfs.
#[derive(Clone, Debug)]
pub struct PciDevice {
    /// Its address, `domain:bus:device.function` (e.g. `0000:00:01.0`).
    pub address: String,
    /// Its sysfs directory, `/sys/bus/pci/devices/<address>`.
    pub sysfs: PathBuf,
}

impl PciDevice {
    /// The name of the driver bound to the device, or `None` if no driver is bound.
    pub fn driver(&self) -> Result<Option<String>, String> {
        link_name(&self.sysfs.join("driver"))
    }

    /// The device's IOMMU group number, or `None` if it is in no group (no IOMMU).
    pub fn iommu_group(&self) -> Result<Option<String>, String> {
        link_name(&self.sysfs.join("iommu_group"))
    }

    /// The size in bytes of BAR `index` (0 if the BAR is not implemented), from the
    /// `resource` file's `start end flags` lines.
    pub fn bar_size(&self, index: usize) -> Result<u64, String> {
        let path = self.sysfs.join("resource");
        let text = read(&path)?;
        let line = text
            .lines()
            .nth(index)
            .ok_or_else(|| format!("{} has no line for BAR {index}", path.display()))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [start, end, _flags] = fields[..] else {
            return Err(format!("{}: unexpected line `{line}`", path.display()));
        };
        let (start, end) = (parse_hex(start)?, parse_hex(end)?);
        Ok(if end > start { end - start + 1 } else { 0 })
    }

    /// The first `len` bytes of the device's configuration space, read through sysfs.
    pub fn config(&self, len: usize) -> Result<Vec<u8>, String> {
        let path = self.sysfs.join("config");
        let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.len() < len {
            return Err(format!(
                "{} has {} bytes, wanted at least {len}",
                path.display(),
                bytes.len()
            ));
        }
        Ok(bytes[..len].to_vec())
    }
}

/// Everything a test may look at: the devices and the settings.
pub struct Env {
    /// The edu devices (`1234:11e8`), in address order.
    pub edu: Vec<PciDevice>,
    /// The NVMe controllers emulated by QEMU (`1b36:0010`), in address order.
    pub nvme: Vec<PciDevice>,
    /// Why the PCI devices could not be listed, if they could not.
    pub discovery_error: Option<String>,
    /// Largest edu DMA transfer to attempt, in bytes: `DMATX_EDU_MAX_TRANSFER`, default
    /// [`EDU_BUFFER_SIZE`]. The run script sets 4095 on QEMU older than 10, whose edu aborts
    /// on a transfer that ends exactly at the end of its buffer.
    pub edu_max_transfer: usize,
    /// Time limit of one test: `DMATX_GUEST_TEST_TIMEOUT` seconds, default 300.
    pub test_timeout: Duration,
    /// Module and bind failures the guest's init counted (`DMATX_INIT_ERRORS`), or `None`
    /// when the harness was not started by it.
    pub init_errors: Option<u32>,
}

impl Env {
    /// Reads the settings from the environment and lists the devices. Fails only on a
    /// malformed setting; a device listing that fails is kept in [`Env::discovery_error`]
    /// for the tests to report.
    pub fn from_system() -> Result<Self, String> {
        let edu_max_transfer =
            setting("DMATX_EDU_MAX_TRANSFER")?.map_or(Ok(EDU_BUFFER_SIZE), |v: usize| {
                if (1..=EDU_BUFFER_SIZE).contains(&v) {
                    Ok(v)
                } else {
                    Err(format!(
                        "DMATX_EDU_MAX_TRANSFER={v} is outside 1..={EDU_BUFFER_SIZE}"
                    ))
                }
            })?;
        let test_timeout = match setting::<u64>("DMATX_GUEST_TEST_TIMEOUT")? {
            Some(0) => return Err("DMATX_GUEST_TEST_TIMEOUT must be positive".to_owned()),
            Some(s) => Duration::from_secs(s),
            None => DEFAULT_TEST_TIMEOUT,
        };
        let init_errors = setting("DMATX_INIT_ERRORS")?;

        let (mut edu, mut nvme, mut discovery_error) = (Vec::new(), Vec::new(), None);
        match find_devices(Path::new(PCI_DEVICES)) {
            Ok(found) => {
                for (id, device) in found {
                    if id == EDU_ID {
                        edu.push(device);
                    } else if id == NVME_ID {
                        nvme.push(device);
                    }
                }
            }
            Err(why) => discovery_error = Some(why),
        }
        Ok(Env {
            edu,
            nvme,
            discovery_error,
            edu_max_transfer,
            test_timeout,
            init_errors,
        })
    }

    /// All discovered test devices, edu first.
    pub fn devices(&self) -> impl Iterator<Item = &PciDevice> {
        self.edu.iter().chain(&self.nvme)
    }

    /// An error describing why no device of `what` (with `id`) is available.
    pub fn none_found(&self, what: &str, id: PciId) -> String {
        let mut why = format!(
            "no {what} device ({:04x}:{:04x}) in {PCI_DEVICES}",
            id.0, id.1
        );
        if let Some(err) = &self.discovery_error {
            why.push_str(&format!(" ({err})"));
        } else {
            why.push_str(" (not inside the dmatx test guest?)");
        }
        why
    }
}

impl fmt::Display for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |list: &[PciDevice]| {
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.iter()
                    .map(|d| d.address.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        write!(
            f,
            "edu: {}; nvme: {}; edu max transfer {} bytes; test timeout {} s",
            names(&self.edu),
            names(&self.nvme),
            self.edu_max_transfer,
            self.test_timeout.as_secs()
        )?;
        if let Some(err) = &self.discovery_error {
            write!(f, "; device listing failed: {err}")?;
        }
        Ok(())
    }
}

/// The PCI functions under `dir` with their (vendor, device) IDs, sorted by address.
fn find_devices(dir: &Path) -> Result<Vec<(PciId, PciDevice)>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let sysfs = entry.path();
        let id = |file: &str| -> Result<u16, String> {
            let value = parse_hex(read(&sysfs.join(file))?.trim())?;
            u16::try_from(value).map_err(|_| format!("{file} {value:#x} is not 16 bits"))
        };
        found.push((
            (id("vendor")?, id("device")?),
            PciDevice {
                address: entry.file_name().to_string_lossy().into_owned(),
                sysfs,
            },
        ));
    }
    found.sort_by(|a, b| a.1.address.cmp(&b.1.address));
    Ok(found)
}

/// A setting from the environment: `None` if unset or empty, an error if it does not parse.
fn setting<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}=`{v}` is not a valid number")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
    }
}

/// The contents of a text file, with the path in the error.
pub fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A hexadecimal number with or without `0x`.
pub fn parse_hex(text: &str) -> Result<u64, String> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    u64::from_str_radix(digits, 16).map_err(|_| format!("`{text}` is not a hexadecimal number"))
}

/// The last component of the symbolic link at `path`, or `None` if there is no such link.
fn link_name(path: &Path) -> Result<Option<String>, String> {
    match fs::read_link(path) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read link {}: {e}", path.display())),
    }
}
