//! A driver process for tests that need to kill a client mid-traffic: opens a device, then
//! sends and receives frames forever, printing `running` once the first frames came back.

use std::io::Write;
use std::path::PathBuf;
use vmdev_tests::make_frame;
use vmdev_tools::{NetDriver, NetDriverConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let run_dir = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: RUN_DIR UUID"))?,
    );
    let uuid = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: RUN_DIR UUID"))?
        .parse()?;
    let mut drv = NetDriver::open(&run_dir, uuid, NetDriverConfig::default())?;
    let mac = drv.mac();
    let window = drv.max_in_flight() as u64;
    let (mut sent, mut got) = (0u64, 0u64);
    let mut buf = Vec::new();
    let mut announced = false;
    loop {
        while sent - got < window && drv.queue_frame(&make_frame(mac, sent, 128))? {
            sent += 1;
        }
        drv.flush()?;
        while drv.recv_into(&mut buf)? {
            got += 1;
        }
        if got > 1000 && !announced {
            println!("running");
            std::io::stdout().flush()?;
            announced = true;
        }
    }
}
