//! The VM's surroundings on the host: a private network namespace holding libvirt (so its
//! management network, 192.168.121.0/24, never appears on the host), the Vagrant state of this
//! test kept apart from the user's own, and a tunnel that lets the guest's apt reach the Debian
//! mirror and nothing else. Dropping the lab destroys the VM and takes all of it down.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::{exec::exec, workspace};

/// The namespace every command of the test runs in.
const NETNS: &str = "proxy-vmtest";
/// The guest's apt proxy: the host side of libvirt's management network, inside the namespace.
const APT_PROXY_PORT: u16 = 3142;
const MANAGEMENT_GATEWAY: &str = "192.168.121.1";

pub struct Lab {
    work: PathBuf,
    tunnels: Vec<Child>,
    keep: bool,
}

impl Lab {
    /// Starts libvirt in a fresh namespace and the apt tunnel to `mirror_host`, after clearing
    /// what an interrupted earlier run may have left.
    pub fn start(work: &Path, mirror_host: &str, keep: bool) -> Result<Self> {
        stop_daemons(work);
        if netns_exists() {
            let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
        }
        exec(Command::new("ip").args(["netns", "add", NETNS]))?;
        let mut lab = Self {
            work: work.to_owned(),
            tunnels: Vec::new(),
            keep,
        };
        exec(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;
        lab.write_overrides()?;
        exec(
            in_netns("virtlogd")
                .arg("-d")
                .arg("-p")
                .arg(lab.pid_file("virtlogd")),
        )?;
        exec(
            in_netns("libvirtd")
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
            in_netns("socat")
                .arg(format!("TCP-LISTEN:{APT_PROXY_PORT},fork,reuseaddr"))
                .arg(format!("UNIX-CONNECT:{}", socket.display())),
        )?);
        wait_for_libvirt()?;
        // A VM an interrupted run left defined would stop `vagrant up`.
        let _ = lab
            .vagrant(Duration::from_secs(300))
            .args(["destroy", "-f"])
            .status();
        Ok(lab)
    }

    /// `vagrant` in the namespace, on the project's Vagrantfile, with this test's Vagrant home
    /// and machine state, building nothing in the VM (the binary comes from `vagrant/bin`).
    /// Killed after `limit`: a guest hung under emulation must not hold CI.
    pub fn vagrant(&self, limit: Duration) -> Command {
        let mut cmd = in_netns("timeout");
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

    fn pid_file(&self, daemon: &str) -> PathBuf {
        self.work.join(format!("{daemon}.pid"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            println!(
                "--keep: the VM and libvirt stay up in network namespace {NETNS}; \
                 `cargo xtask vm-test --destroy` takes them down"
            );
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
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    }
}

/// `program` run inside the test's namespace.
pub fn in_netns(program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", NETNS, program]);
    cmd
}

/// Takes down the libvirt daemons of this lab (or of an earlier, interrupted one).
pub fn destroy_leftovers(work: &Path) {
    stop_daemons(work);
    if netns_exists() {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    }
}

fn stop_daemons(work: &Path) {
    for daemon in ["libvirtd", "virtlogd"] {
        let pid_file = work.join(format!("{daemon}.pid"));
        if let Ok(pid) = fs::read_to_string(&pid_file) {
            let _ = Command::new("kill").arg(pid.trim()).status();
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

fn netns_exists() -> bool {
    Path::new("/run/netns").join(NETNS).exists()
}

fn spawn(cmd: &mut Command) -> Result<Child> {
    println!("$ {} &", crate::exec::display(cmd));
    cmd.stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("failed to start {}", crate::exec::display(cmd)))
}

fn wait_for_libvirt() -> Result<()> {
    for _ in 0..30 {
        let up = in_netns("virsh")
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

/// Whether the CPU offers VT-x/AMD-V. A /dev/kvm without them (a paravirtualised one) cannot
/// run a stock guest kernel: the VM then runs under software emulation.
fn hardware_virtualisation() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}
