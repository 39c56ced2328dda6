//! The GPU as a simulated GPU folder describes it (docs/ARCHITECTURE.md, "Simulated GPU
//! folder"): the demo and the tests run the daemon on it without any NVIDIA library.
//! The folder's rules live in the `sim-gpu` crate, shared with the fake libnvidia-ml, so
//! both backends report the same numbers for the same folder.

use std::io;
use std::path::Path;

use sim_gpu::{SimGpuDir, Snapshot};

use super::gpu::{Gpu, GpuError, GpuProcess, GpuSample};

pub struct SimulatedGpu {
    dir: SimGpuDir,
}

impl SimulatedGpu {
    /// Opens the folder, reading its `device.json` once so that a wrong path fails at
    /// start.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GpuError> {
        let path = path.as_ref();
        let dir = SimGpuDir::open(path).map_err(|error| folder_error(path, &error))?;
        Ok(Self { dir })
    }
}

impl Gpu for SimulatedGpu {
    fn describe(&self) -> String {
        format!("simulated GPU ({})", self.dir.path().display())
    }

    fn sample(&self) -> Result<GpuSample, GpuError> {
        let snapshot = self
            .dir
            .snapshot()
            .map_err(|error| folder_error(self.dir.path(), &error))?;
        Ok(to_sample(snapshot))
    }
}

fn to_sample(snapshot: Snapshot) -> GpuSample {
    GpuSample {
        name: snapshot.device.name,
        total_mb: snapshot.device.total_mb,
        used_mb: snapshot.used_mb,
        free_mb: snapshot.free_mb,
        temperature_c: Some(snapshot.device.temperature_c),
        utilization_pct: Some(snapshot.device.utilization_pct),
        processes: snapshot
            .processes
            .into_iter()
            .map(|allocation| GpuProcess {
                pid: allocation.pid,
                used_mb: allocation.mb,
            })
            .collect(),
    }
}

fn folder_error(path: &Path, error: &io::Error) -> GpuError {
    GpuError::Simulated {
        path: path.display().to_string(),
        detail: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use sim_gpu::DeviceSpec;

    use super::*;

    #[test]
    fn samples_the_folder() {
        let temp = tempfile::tempdir().unwrap();
        let device = DeviceSpec {
            name: "Simulated RTX 4090".into(),
            total_mb: 24_576,
            baseline_mb: 800,
            reclaim_ms: 1000,
            temperature_c: 52,
            utilization_pct: 30,
        };
        let dir = SimGpuDir::create(temp.path(), &device).unwrap();
        let pid = std::process::id();
        dir.allocate(pid, 4096).unwrap();
        let gpu = SimulatedGpu::open(temp.path()).unwrap();
        assert_eq!(
            gpu.sample().unwrap(),
            GpuSample {
                name: "Simulated RTX 4090".into(),
                total_mb: 24_576,
                used_mb: 4896,
                free_mb: 19_680,
                temperature_c: Some(52),
                utilization_pct: Some(30),
                processes: vec![GpuProcess { pid, used_mb: 4096 }],
            }
        );
        assert!(gpu.describe().contains(&temp.path().display().to_string()));
    }

    #[test]
    fn a_missing_folder_is_named_in_the_error() {
        let temp = tempfile::tempdir().unwrap();
        let missing = temp.path().join("nowhere");
        match SimulatedGpu::open(&missing) {
            Err(GpuError::Simulated { path, detail }) => {
                assert_eq!(path, missing.display().to_string());
                assert!(detail.contains("not a simulated GPU folder"), "{detail}");
            }
            other => panic!("expected a folder error, got {:?}", other.err()),
        }
    }
}
