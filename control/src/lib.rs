//! vmdev control plane.
//!
//! * [`profile`]: what each device type offers (ids, features, config space, queues).
//! * [`defined`]: persistent device definitions (mdevctl `define`).
//! * [`model`]: one device as a sans-IO state machine (request in → reply or action out).
//! * [`registry`]: parents (datapath processes), devices and who holds them.
//! * [`parent`]: the link to one datapath process (numbered requests, replies, events).
//! * [`server`]: the daemon: sockets, connections, and carrying out the model's actions.
//! * [`vhost_user`]: the vhost-user front door (QEMU, DPDK virtio-user).
//! * [`vduse`]: the VDUSE front door (the kernel's virtio_vdpa / vhost_vdpa), with
//!   [`vduse_sys`] (the VDUSE uAPI) and [`vdpa`] (vDPA bus netlink and sysfs binding).

#![warn(missing_docs)]

pub mod defined;
pub mod model;
pub mod parent;
pub mod profile;
pub mod registry;
pub mod server;
pub mod sys;
pub mod vdpa;
pub mod vduse;
pub mod vduse_sys;
pub mod vhost_user;
