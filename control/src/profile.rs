//! What a device type looks like to a driver: ids, offered features, config space, queues.
//! One function per type; a new type is a new constructor here (or a new file), not a new
//! state machine.

use vmdev_proto::transport::VqState;
use vmdev_proto::virtio::{device_id, features as f, net, VMDEV_VENDOR_ID};
use vmdev_proto::{ErrorCode, WireError};

/// The static description of one device instance, built from its type and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProfile {
    /// Type name as offered by parents.
    pub type_name: String,
    /// Virtio device id.
    pub device_id: u32,
    /// Vendor id.
    pub vendor_id: u32,
    /// Feature bits offered.
    pub offered: u64,
    /// Initial config space.
    pub config: Vec<u8>,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Largest queue size.
    pub max_queue_size: u16,
    /// Queues that must be ready at DRIVER_OK.
    pub required_queues: Vec<u16>,
}

/// Most queue pairs a net-loopback device may have.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// Name of the sample device type.
pub const NET_LOOPBACK: &str = "net-loopback";

/// Builds the profile of a device of `type_name` with `attrs`; unknown attributes and bad
/// values are errors.
pub fn build(
    type_name: &str,
    attrs: &[(String, String)],
    seed: u128,
) -> Result<DeviceProfile, WireError> {
    match type_name {
        NET_LOOPBACK => net_loopback(attrs, seed),
        other => Err(WireError::new(
            ErrorCode::NoSuchType,
            format!("unknown device type '{other}' (known: {NET_LOOPBACK})"),
        )),
    }
}

fn bad(msg: String) -> WireError {
    WireError::new(ErrorCode::BadArgument, msg)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], WireError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(bad(format!(
            "mac '{s}' is not six hex bytes separated by ':'"
        )));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = u8::from_str_radix(p, 16)
            .map_err(|_| bad(format!("mac '{s}': '{p}' is not a hex byte")))?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad(format!("mac '{s}' is a multicast address")));
    }
    Ok(mac)
}

fn net_loopback(attrs: &[(String, String)], seed: u128) -> Result<DeviceProfile, WireError> {
    let s = seed.to_le_bytes();
    let mut mac = [0x52, 0x54, 0x00, s[0], s[1], s[2]];
    let mut mtu = net::DEFAULT_MTU;
    let mut qsize: u16 = 256;
    let mut pairs: u16 = 1;
    for (k, v) in attrs {
        match k.as_str() {
            "mac" => mac = parse_mac(v)?,
            "mtu" => {
                mtu = v
                    .parse()
                    .ok()
                    .filter(|m| (68..=9000).contains(m))
                    .ok_or_else(|| bad(format!("mtu '{v}' is not a number in 68..=9000")))?
            }
            "queue-size" => {
                qsize = v
                    .parse()
                    .ok()
                    .filter(|q: &u16| q.is_power_of_two() && *q <= 32768)
                    .ok_or_else(|| bad(format!("queue-size '{v}' is not a power of two up to 32768")))?
            }
            "queue-pairs" => {
                pairs = v
                    .parse()
                    .ok()
                    .filter(|p| (1..=MAX_QUEUE_PAIRS).contains(p))
                    .ok_or_else(|| bad(format!("queue-pairs '{v}' is not a number in 1..={MAX_QUEUE_PAIRS}")))?
            }
            other => {
                return Err(bad(format!(
                    "unknown attribute '{other}' for {NET_LOOPBACK} (known: mac, mtu, queue-size, queue-pairs)"
                )))
            }
        }
    }
    let mut config = vec![0u8; net::CONFIG_LEN];
    config[net::CONFIG_MAC..net::CONFIG_MAC + 6].copy_from_slice(&mac);
    config[net::CONFIG_STATUS..net::CONFIG_STATUS + 2]
        .copy_from_slice(&net::STATUS_LINK_UP.to_le_bytes());
    config[net::CONFIG_MAX_VQ_PAIRS..net::CONFIG_MAX_VQ_PAIRS + 2]
        .copy_from_slice(&pairs.to_le_bytes());
    config[net::CONFIG_MTU..net::CONFIG_MTU + 2].copy_from_slice(&mtu.to_le_bytes());
    Ok(DeviceProfile {
        type_name: NET_LOOPBACK.into(),
        device_id: device_id::NET,
        vendor_id: VMDEV_VENDOR_ID,
        offered: f::VERSION_1
            | f::NET_F_MAC
            | f::NET_F_MTU
            | f::NET_F_STATUS
            | f::NET_F_MRG_RXBUF
            | f::NET_F_CTRL_VQ
            | f::NET_F_MQ
            | f::RING_EVENT_IDX
            | f::RING_INDIRECT_DESC
            | f::RING_PACKED
            | f::IN_ORDER,
        config,
        num_queues: 2 * pairs + 1,
        max_queue_size: qsize,
        required_queues: vec![net::RX_QUEUE, net::TX_QUEUE],
    })
}

/// The form of a profile that the kernel accepts over VDUSE: addresses are IOVAs
/// (ACCESS_PLATFORM offered), and a net device has no control queue, hence one queue pair.
pub fn vduse_form(mut p: DeviceProfile) -> Result<DeviceProfile, WireError> {
    if p.device_id == device_id::NET {
        if p.num_queues > 3 {
            return Err(bad(
                "a VDUSE net device has no control queue, hence one queue pair only".into(),
            ));
        }
        p.offered &= !(f::NET_F_CTRL_VQ | f::NET_F_MQ);
        p.num_queues = 2;
        p.required_queues.retain(|&q| q < 2);
    }
    p.offered |= f::ACCESS_PLATFORM | f::VERSION_1;
    Ok(p)
}

/// Frames lost when a datapath died, from the ring positions before (last attach) and
/// after (recovered from the used rings): for the net loopback, every TX chain completed
/// without its frame reaching RX, as (queue, count). Exact when nothing else was dropped
/// since the last attach (a driver short of RX buffers makes it an upper bound).
pub fn crash_losses(
    p: &DeviceProfile,
    before: &[(u16, VqState)],
    after: &[(u16, VqState)],
) -> Vec<(u16, u64)> {
    if p.device_id != device_id::NET {
        return Vec::new();
    }
    let used = |v: &[(u16, VqState)], q: u16| {
        v.iter()
            .find(|(i, _)| *i == q)
            .and_then(|(_, st)| match st {
                VqState::Split { used_index, .. } => Some(*used_index),
                VqState::Packed { .. } => None,
            })
    };
    let mut lost = Vec::new();
    for pair in 0..p.num_queues / 2 {
        let (rxq, txq) = (2 * pair, 2 * pair + 1);
        if let (Some(r0), Some(r1), Some(t0), Some(t1)) = (
            used(before, rxq),
            used(after, rxq),
            used(before, txq),
            used(after, txq),
        ) {
            let n = t1.wrapping_sub(t0).wrapping_sub(r1.wrapping_sub(r0));
            if n != 0 && n < 0x8000 {
                lost.push((rxq, n as u64));
            }
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vduse_form_has_no_control_queue_and_offers_access_platform() {
        let p = vduse_form(build(NET_LOOPBACK, &[], 0).unwrap()).unwrap();
        assert_eq!(p.num_queues, 2);
        assert_eq!(p.offered & (f::NET_F_CTRL_VQ | f::NET_F_MQ), 0);
        assert_ne!(p.offered & f::ACCESS_PLATFORM, 0);
        let two = vec![("queue-pairs".to_string(), "2".to_string())];
        let e = vduse_form(build(NET_LOOPBACK, &two, 0).unwrap()).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgument);
    }

    #[test]
    fn attributes_are_validated() {
        let a = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(build(NET_LOOPBACK, &a("mac", "52:54:00:01:02:03"), 0).is_ok());
        assert!(build(NET_LOOPBACK, &a("mac", "01:54:00:01:02:03"), 0).is_err());
        assert!(build(NET_LOOPBACK, &a("mac", "zz"), 0).is_err());
        assert!(build(NET_LOOPBACK, &a("queue-size", "100"), 0).is_err());
        assert!(build(NET_LOOPBACK, &a("mtu", "9001"), 0).is_err());
        assert!(build(NET_LOOPBACK, &a("colour", "blue"), 0).is_err());
        assert_eq!(
            build("blk", &[], 0).unwrap_err().code,
            ErrorCode::NoSuchType
        );
        let p = build(NET_LOOPBACK, &a("mtu", "9000"), 0).unwrap();
        assert_eq!(&p.config[10..12], &9000u16.to_le_bytes());
        let p = build(NET_LOOPBACK, &a("queue-pairs", "4"), 0).unwrap();
        assert_eq!(p.num_queues, 9, "4 pairs and a control queue");
        assert_eq!(&p.config[8..10], &4u16.to_le_bytes());
        assert!(build(NET_LOOPBACK, &a("queue-pairs", "0"), 0).is_err());
        assert!(build(NET_LOOPBACK, &a("queue-pairs", "17"), 0).is_err());
    }
}
