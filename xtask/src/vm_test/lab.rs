//! The VM's surroundings on the host: a private network namespace holding libvirt (so its
//! management network, 192.168.121.0/24, never appears on the host), the Vagrant state of this
//! test kept apart from the user's own, and a tunnel that lets the guest's apt reach the Debian
//! mirror and nothing else. Dropping the lab destroys the VM and takes all of it down.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use proxy_testkit::{NetNs, netns};

use crate::{exec::exec, workspace};

/// The namespace every command of the test runs in.
const NETNS: &str = "proxy-vmtest";
/// The guest's apt proxy: the host side of libvirt's management network, inside the namespace.
const APT_PROXY_PORT: u16 = 3142;
/// What a program squatting on a host port answers (see [`Lab::occupy_port`]).
const OCCUPANT_GREETING: &str = "port taken by vm-test";
/// The domain vagrant-libvirt names after the Vagrantfile's directory and machine.
const LEFTOVER_DOMAIN: &str = "vagrant_default";
const MANAGEMENT_GATEWAY: &str = "192.168.121.1";

/// The host side of the VM's forwards (Grafana is not installed in the test).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostPorts {
    pub http: u16,
    pub https: u16,
    pub prometheus: u16,
    pub alertmanager: u16,
}

pub(crate) struct Lab {
    work: PathBuf,
    tunnels: Vec<Child>,
    keep: bool,
    /// Deleted last, when every process of the lab has stopped.
    ns: NetNs,
}

impl Lab {
    /// Starts libvirt in a fresh namespace and the apt tunnel to `mirror_host`, after clearing
    /// what an interrupted earlier run may have left.
    pub(crate) fn start(work: &Path, mirror_host: &str, keep: bool) -> Result<Self> {
        stop_daemons(work);
        let mut lab = Self {
            work: work.to_owned(),
            tunnels: Vec::new(),
            keep,
            ns: NetNs::create_named(NETNS)?,
        };
        lab.write_overrides()?;
        exec(
            lab.command("virtlogd")
                .arg("-d")
                .arg("-p")
                .arg(lab.pid_file("virtlogd")),
        )?;
        exec(
            lab.command("libvirtd")
                .arg("-d")
                .arg("-p")
                .arg(lab.pid_file("libvirtd")),
        )?;
        // The guest's apt talks HTTP to the gateway's port; socat carries it over a Unix socket
        // (which crosses namespaces) to the mirror, the only place it can reach.
        let socket = work.join("apt.sock");
        let _ = fs::remove_file(&socket);
        lab.tunnels.push(spawn(
            Command::new("socat")
                .arg(format!("UNIX-LISTEN:{},fork,mode=600", socket.display()))
                .arg(format!("TCP:{mirror_host}:80")),
        )?);
        lab.tunnels.push(spawn(
            lab.command("socat")
                .arg(format!("TCP-LISTEN:{APT_PROXY_PORT},fork,reuseaddr"))
                .arg(format!("UNIX-CONNECT:{}", socket.display())),
        )?);
        lab.wait_for_libvirt()?;
        // A VM an interrupted run left defined would stop `vagrant up`. Vagrant destroys what
        // its machine state knows of; a run killed before it recorded the VM leaves a domain
        // only libvirt knows, taken down by name.
        let _ = lab
            .vagrant(Duration::from_secs(300))
            .args(["destroy", "-f"])
            .status();
        lab.undefine_leftover_domain();
        Ok(lab)
    }

    /// `vagrant` in the namespace, on the project's Vagrantfile, with this test's Vagrant home
    /// and machine state, building nothing in the VM (the binary comes from `vagrant/bin`).
    /// Killed after `limit`: a guest hung under emulation must not hold CI.
    pub(crate) fn vagrant(&self, limit: Duration) -> Command {
        let mut cmd = self.command("timeout");
        cmd.args(["--kill-after=30", &limit.as_secs().to_string(), "vagrant"]);
        cmd.current_dir(workspace::root().join("vagrant"))
            .env("VAGRANT_HOME", self.work.join("vagrant-home"))
            .env("VAGRANT_DOTFILE_PATH", self.work.join("machine"))
            .env("VAGRANT_CHECKPOINT_DISABLE", "1")
            .env("VAGRANT_BOX_UPDATE_CHECK_DISABLE", "1")
            .env("PROXY_VM_PREBUILT", "1")
            .env("PROXY_VM_GRAFANA", "0")
            .env("PROXY_VM_MEMORY", "1536");
        cmd
    }

    /// Keeps 127.0.0.1:`port` of the lab's namespace (the host side of the forwards) busy, as
    /// another program on a user's machine would, until the lab is taken down.
    pub(crate) fn occupy_port(&mut self, port: u16) -> Result<()> {
        self.tunnels.push(spawn(
            self.command("socat")
                .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
                .arg(format!("SYSTEM:echo '{OCCUPANT_GREETING}'")),
        )?);
        for _ in 0..50 {
            if self.occupant_answers(port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("socat did not start listening on 127.0.0.1:{port}")
    }

    /// Whether 127.0.0.1:`port` still answers as [`Self::occupy_port`]'s squatter.
    pub(crate) fn occupant_answers(&self, port: u16) -> bool {
        self.command("socat")
            .args(["-T", "5", "-u", &format!("TCP:127.0.0.1:{port}"), "STDOUT"])
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(OCCUPANT_GREETING))
    }

    /// The host ports the Vagrantfile forwarded, from the record it keeps in Vagrant's state
    /// directory while the VM exists.
    pub(crate) fn host_ports(&self) -> Result<HostPorts> {
        let path = self.work.join("machine/proxy-host-ports.json");
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "the Vagrantfile recorded no host ports in {}",
                path.display()
            )
        })?;
        let record: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let port = |name: &str| {
            record[name]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .with_context(|| format!("{} has no port for {name}: {text}", path.display()))
        };
        Ok(HostPorts {
            http: port("http")?,
            https: port("https")?,
            prometheus: port("prometheus")?,
            alertmanager: port("alertmanager")?,
        })
    }

    /// The overrides this test merges under the project's Vagrantfile (Vagrant reads
    /// `$VAGRANT_HOME/Vagrantfile` first): software emulation where the CPU has no
    /// virtualisation, and apt through the tunnel.
    fn write_overrides(&self) -> Result<()> {
        let home = self.work.join("vagrant-home");
        fs::create_dir_all(&home)?;
        let driver = if hardware_virtualisation() {
            "kvm"
        } else {
            "qemu"
        };
        fs::write(
            home.join("Vagrantfile"),
            format!(
                r#"# Written by `cargo xtask vm-test`.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "{driver}"
  end
  config.vm.provision "vm-test-apt-proxy", type: "shell",
    inline: "echo 'Acquire::http::Proxy \"http://{MANAGEMENT_GATEWAY}:{APT_PROXY_PORT}\";' > /etc/apt/apt.conf.d/01vm-test-proxy"
end
"#
            ),
        )?;
        println!("libvirt driver: {driver}");
        Ok(())
    }

    /// `program` run in the lab's namespace. Through `ip netns exec`, as libvirtd needs: a
    /// `/sys` that shows the namespace's own network devices (its bridge) and no cgroup
    /// hierarchy to place VMs in; the proxy runs in the VM, not here.
    pub(crate) fn command(&self, program: &str) -> Command {
        self.ns.ip_netns_exec(program)
    }

    fn pid_file(&self, daemon: &str) -> PathBuf {
        self.work.join(format!("{daemon}.pid"))
    }

    /// Stops and undefines the Vagrantfile's domain (`vagrant_default`, from the directory
    /// name and the machine name) with its disks, if libvirt still has it.
    fn undefine_leftover_domain(&self) {
        let known = self
            .command("virsh")
            .args(["-c", "qemu:///system", "domstate", LEFTOVER_DOMAIN])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !known {
            return;
        }
        println!("taking down {LEFTOVER_DOMAIN}, left defined by an interrupted run");
        let _ = self
            .command("virsh")
            .args(["-c", "qemu:///system", "destroy", LEFTOVER_DOMAIN])
            .status();
        let _ = self
            .command("virsh")
            .args(["-c", "qemu:///system", "undefine", LEFTOVER_DOMAIN])
            .args(["--remove-all-storage", "--nvram"])
            .status();
    }

    fn wait_for_libvirt(&self) -> Result<()> {
        for _ in 0..30 {
            let up = self
                .command("virsh")
                .args(["-c", "qemu:///system", "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        bail!("libvirtd did not answer within 30 s")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            println!(
                "--keep: the VM and libvirt stay up in network namespace {NETNS}; \
                 `cargo xtask vm-test --destroy` takes them down"
            );
            self.ns.keep();
            return;
        }
        let _ = self
            .vagrant(Duration::from_secs(300))
            .args(["destroy", "-f"])
            .status();
        for tunnel in &mut self.tunnels {
            let _ = tunnel.kill();
            let _ = tunnel.wait();
        }
        stop_daemons(&self.work);
    }
}

/// Takes down the libvirt daemons of this lab (or of an earlier, interrupted one) and its
/// namespace.
pub(crate) fn destroy_leftovers(work: &Path) {
    stop_daemons(work);
    if let Err(e) = netns::delete(NETNS) {
        eprintln!("warning: {e}");
    }
}

fn stop_daemons(work: &Path) {
    for daemon in ["libvirtd", "virtlogd"] {
        let pid_file = work.join(format!("{daemon}.pid"));
        if let Ok(pid) = fs::read_to_string(&pid_file) {
            if let Ok(pid) = pid.trim().parse() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let _ = fs::remove_file(&pid_file);
        }
    }
    // The namespace's socat, if a run was killed before it could clean up.
    let _ = Command::new("pkill")
        .args([
            "-f",
            &format!("UNIX-CONNECT:{}", work.join("apt.sock").display()),
        ])
        .status();
    let _ = Command::new("pkill")
        .args([
            "-f",
            &format!("UNIX-LISTEN:{}", work.join("apt.sock").display()),
        ])
        .status();
    std::thread::sleep(Duration::from_secs(1));
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    println!("$ {} &", crate::exec::display(cmd));
    cmd.stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("failed to start {}", crate::exec::display(cmd)))
}

/// Whether the CPU offers VT-x/AMD-V. A /dev/kvm without them (a paravirtualised one) cannot
/// run a stock guest kernel: the VM then runs under software emulation.
fn hardware_virtualisation() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}
