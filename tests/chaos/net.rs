//! A network of its own for each trial that partitions: every node in a network namespace
//! of its own, joined to a bridge in the test's namespace by a veth pair, with an address
//! of its own. Cutting a node takes its bridge port down (packets to and from it are
//! dropped, connections stall as on a real partition); healing brings it up again.
//! Everything is removed when the `Network` is dropped.

use std::process::Command;

pub struct Network {
    /// Names are this process's: concurrent runs do not collide.
    tag: u32,
    /// The /24 (first three octets) of this network.
    subnet: String,
    nodes: u64,
}

impl Network {
    /// Creates the bridge and `nodes` namespaces; why not, if it cannot (no `ip`, not root).
    pub fn create(nodes: u64) -> Result<Self, String> {
        let tag = std::process::id();
        let network = Self {
            tag,
            subnet: format!("10.{}.{}", 200 + (tag >> 8) % 50, tag & 0xff),
            nodes,
        };
        // Leftovers of an earlier process with the same id.
        network.remove();
        let bridge = network.bridge();
        let made = (|| {
            ip(&["link", "add", &bridge, "type", "bridge"])?;
            ip(&[
                "addr",
                "add",
                &format!("{}.1/24", network.subnet),
                "dev",
                &bridge,
            ])?;
            ip(&["link", "set", &bridge, "up"])?;
            for id in 1..=nodes {
                let (ns, port) = (network.namespace(id), network.port(id));
                ip(&["netns", "add", &ns])?;
                ip(&[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ])?;
                ip(&["link", "set", &port, "master", &bridge, "up"])?;
                let inside = |args: &[&str]| {
                    let mut all = vec!["netns", "exec", &ns, "ip"];
                    all.extend(args);
                    ip(&all)
                };
                inside(&[
                    "addr",
                    "add",
                    &format!("{}/24", network.addr(id)),
                    "dev",
                    "eth0",
                ])?;
                inside(&["link", "set", "eth0", "up"])?;
                inside(&["link", "set", "lo", "up"])?;
            }
            Ok(())
        })();
        made.map(|()| network)
    }

    /// What runs node `id`'s command line in its namespace, and the address it listens on.
    pub fn wrap(&self, id: u64) -> (Vec<String>, String) {
        (
            vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                self.namespace(id),
            ],
            self.addr(id),
        )
    }

    /// Node `id` partitioned from every other node and from the test's clients.
    pub fn cut(&self, id: u64) {
        ip(&["link", "set", &self.port(id), "down"]).expect("cut a node's link");
    }

    pub fn heal(&self, id: u64) {
        ip(&["link", "set", &self.port(id), "up"]).expect("heal a node's link");
    }

    fn bridge(&self) -> String {
        format!("chb{}", self.tag)
    }

    fn namespace(&self, id: u64) -> String {
        format!("chaos-{}-{id}", self.tag)
    }

    /// The bridge's end of node `id`'s veth pair (15 bytes at most, as interface names are).
    fn port(&self, id: u64) -> String {
        format!("chv{}-{id}", self.tag)
    }

    fn addr(&self, id: u64) -> String {
        format!("{}.{}", self.subnet, 10 + id)
    }

    fn remove(&self) {
        for id in 1..=self.nodes {
            let _ = ip(&["link", "del", &self.port(id)]);
            let _ = ip(&["netns", "del", &self.namespace(id)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
