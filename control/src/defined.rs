//! mdevctl-style persistence: devices *defined* in `STATE_DIR/devices.toml`, started on
//! demand (`vmdevctl start -u UUID`) or automatically when their parent registers
//! (`auto = true`). The file is rewritten atomically: a temporary file, fsync, rename.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use uuid::Uuid;
use vmdev_proto::transport::DefinedDevice;

/// Failures reading or writing the definitions file.
#[derive(Debug, thiserror::Error)]
pub enum DefinedError {
    /// File system error.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        err: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {err}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        err: String,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default, rename = "device")]
    devices: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    uuid: Uuid,
    parent: String,
    #[serde(rename = "type")]
    device_type: String,
    #[serde(default)]
    auto: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vhost_user: Option<String>,
    #[serde(default)]
    attrs: Vec<(String, String)>,
}

/// The set of defined devices, backed by a file.
pub struct Definitions {
    path: PathBuf,
    devices: Vec<DefinedDevice>,
}

impl Definitions {
    /// Loads `dir/devices.toml` (an absent file means no definitions).
    pub fn load(dir: &Path) -> Result<Self, DefinedError> {
        let path = dir.join("devices.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(DefinedError::Io { path, err }),
        };
        let file: File = toml::from_str(&text).map_err(|e| DefinedError::Parse {
            path: path.clone(),
            err: e.to_string(),
        })?;
        let devices = file
            .devices
            .into_iter()
            .map(|e| DefinedDevice {
                uuid: e.uuid,
                parent: e.parent,
                device_type: e.device_type,
                attrs: e.attrs,
                vhost_user: e.vhost_user,
                auto: e.auto,
            })
            .collect();
        Ok(Definitions { path, devices })
    }

    /// All definitions.
    pub fn list(&self) -> &[DefinedDevice] {
        &self.devices
    }

    /// The definition of `uuid`.
    pub fn get(&self, uuid: &Uuid) -> Option<&DefinedDevice> {
        self.devices.iter().find(|d| d.uuid == *uuid)
    }

    /// Adds or replaces a definition and saves the file.
    pub fn define(&mut self, d: DefinedDevice) -> Result<(), DefinedError> {
        let mut next = self.devices.clone();
        next.retain(|x| x.uuid != d.uuid);
        next.push(d);
        self.save(&next)?;
        self.devices = next;
        Ok(())
    }

    /// Removes a definition and saves the file; `false` if there was none.
    pub fn undefine(&mut self, uuid: &Uuid) -> Result<bool, DefinedError> {
        let mut next = self.devices.clone();
        next.retain(|x| x.uuid != *uuid);
        if next.len() == self.devices.len() {
            return Ok(false);
        }
        self.save(&next)?;
        self.devices = next;
        Ok(true)
    }

    fn save(&self, devices: &[DefinedDevice]) -> Result<(), DefinedError> {
        let file = File {
            devices: devices
                .iter()
                .map(|d| Entry {
                    uuid: d.uuid,
                    parent: d.parent.clone(),
                    device_type: d.device_type.clone(),
                    auto: d.auto,
                    vhost_user: d.vhost_user.clone(),
                    attrs: d.attrs.clone(),
                })
                .collect(),
        };
        let text = toml::to_string_pretty(&file).map_err(|e| DefinedError::Parse {
            path: self.path.clone(),
            err: e.to_string(),
        })?;
        let io = |err| DefinedError::Io {
            path: self.path.clone(),
            err,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("toml.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(b"# vmdev defined devices (written by vmdev-control)\n")
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}
