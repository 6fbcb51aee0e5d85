//! Who is who: registered parents, devices, and which driver connection holds which device.
//!
//! Lock order: the registry first, then a device; never the other way round. A device's
//! lock may be held across a datapath call; the registry's never is.

use crate::model::DeviceModel;
use crate::parent::ParentLink;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;
use vmdev_proto::transport::{DeviceInfo, DeviceStats, ParentInfo, TypeInfo};

/// One device and everything the control plane keeps about it.
pub struct Device {
    /// Its UUID.
    pub uuid: Uuid,
    /// Attributes it was created with.
    pub attrs: Vec<(String, String)>,
    /// The transport-visible state machine.
    pub model: DeviceModel,
    /// Handle used on the datapath link.
    pub handle: u64,
    /// The parent servicing it.
    pub link: Arc<ParentLink>,
    /// Connection id of the driver holding it.
    pub claimed_by: Option<u64>,
    /// Counters of earlier attachments (added to live ones).
    pub base_stats: DeviceStats,
    /// Set when the device was stopped; holders get `NoSuchDevice`.
    pub removed: bool,
    /// The vhost-user front door, if the device has one.
    pub door: Option<Arc<crate::vhost_user::Door>>,
    /// Times the device was recovered after its datapath died.
    pub recoveries: u64,
    /// The VDUSE front door, if the device has one.
    pub vduse: Option<Arc<crate::vduse::VduseDoor>>,
}

/// A device entry as the registry indexes it.
#[derive(Clone)]
pub struct Slot {
    /// Parent name.
    pub parent: String,
    /// Device type.
    pub device_type: String,
    /// The device.
    pub dev: Arc<Mutex<Device>>,
}

/// All parents and devices.
#[derive(Default)]
pub struct Registry {
    /// Parents by name.
    pub parents: HashMap<String, Arc<ParentLink>>,
    /// Devices by UUID.
    pub devices: HashMap<Uuid, Slot>,
    /// Device UUIDs by datapath handle.
    pub handles: HashMap<u64, Uuid>,
    next_handle: u64,
}

/// Locks a mutex, ignoring poisoning (a panicking thread must not take the daemon down).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// A fresh handle for a new device.
    pub fn new_handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    /// Instances of `device_type` in use on `parent`.
    pub fn used(&self, parent: &str, device_type: &str) -> u32 {
        self.devices
            .values()
            .filter(|s| s.parent == parent && s.device_type == device_type)
            .count() as u32
    }

    /// What `vmdevctl types` shows.
    pub fn parent_infos(&self) -> Vec<ParentInfo> {
        let mut v: Vec<ParentInfo> = self
            .parents
            .values()
            .map(|p| ParentInfo {
                name: p.name.clone(),
                pid: p.pid,
                cpu: p.cpu,
                types: p
                    .types
                    .iter()
                    .map(|(t, max)| TypeInfo {
                        name: t.clone(),
                        max_instances: *max,
                        available: max.saturating_sub(self.used(&p.name, t)),
                    })
                    .collect(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// What `vmdevctl list` shows.
    pub fn device_infos(&self) -> Vec<DeviceInfo> {
        let mut v: Vec<DeviceInfo> = self
            .devices
            .values()
            .map(|s| {
                let d = lock(&s.dev);
                DeviceInfo {
                    uuid: d.uuid,
                    parent: s.parent.clone(),
                    device_type: s.device_type.clone(),
                    status: d.model.status(),
                    driver_features: d.model.state_parts().0,
                    claimed: d.claimed_by.is_some(),
                    attached: d.model.is_attached(),
                    attrs: d.attrs.clone(),
                    vhost_user: d.door.as_ref().map(|door| door.path.display().to_string()),
                    vduse: d.vduse.as_ref().map(|v| {
                        (
                            v.name.clone(),
                            v.vhost_path.as_ref().map(|p| p.display().to_string()),
                        )
                    }),
                }
            })
            .collect();
        v.sort_by_key(|d| d.uuid);
        v
    }

    /// Removes a device from the indexes; returns it.
    pub fn remove(&mut self, uuid: &Uuid) -> Option<Slot> {
        let slot = self.devices.remove(uuid)?;
        self.handles.retain(|_, u| u != uuid);
        Some(slot)
    }
}
