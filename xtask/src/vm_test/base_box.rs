//! The Debian 12 base box the VM test boots, built locally and registered under the name the
//! Vagrantfile asks for (`bento/debian-12`), so that nothing comes from Vagrant Cloud: a
//! debootstrapped tree made into a Vagrant base box (the `vagrant` user with Vagrant's insecure
//! key and passwordless sudo, DHCP on eth0, ssh host keys made at first boot) on a qcow2 disk
//! (MBR, one ext4 partition, extlinux).
//!
//! The box is built once and kept in the work directory: the recipe below is its cache key, so
//! a change to it rebuilds the box.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::exec::exec;

/// The name the project's Vagrantfile uses.
pub(super) const NAME: &str = "bento/debian-12";
/// Packages of the base tree: what a bento box has that provisioning and Vagrant rely on.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "linux-image-amd64",
    "openssh-server",
    "sudo",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "rsync",
    "ca-certificates",
    "curl",
    "less",
    "procps",
    "dbus",
    "libpam-systemd",
    "zstd",
];
const DISK_SIZE: &str = "8G";
/// Bumped when the recipe changes in a way [`PACKAGES`] does not show.
const RECIPE_VERSION: u32 = 1;

/// Builds the box file under `work` unless the cached one matches the recipe; returns its path.
pub(super) fn ensure(work: &Path, mirror: &str) -> Result<PathBuf> {
    let box_file = work.join("debian-12.box");
    let stamp = work.join("debian-12.box.recipe");
    let recipe = format!("v{RECIPE_VERSION} {mirror} {}", PACKAGES.join(","));
    if box_file.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(&recipe) {
        println!("base box: {} (cached)", box_file.display());
        return Ok(box_file);
    }
    let rootfs = work.join("rootfs");
    let box_dir = work.join("box");
    for dir in [&rootfs, &box_dir] {
        if dir.exists() {
            fs::remove_dir_all(dir)
                .with_context(|| format!("failed to remove {}", dir.display()))?;
        }
    }
    fs::create_dir_all(&box_dir)?;
    exec(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg("bookworm")
            .arg(&rootfs)
            .arg(mirror),
    )?;
    configure(&rootfs)?;
    make_disk(&rootfs, &box_dir.join("box.img"))?;
    fs::write(
        box_dir.join("metadata.json"),
        r#"{"provider":"libvirt","format":"qcow2","virtual_size":8}"#,
    )?;
    fs::write(
        box_dir.join("Vagrantfile"),
        "Vagrant.configure(\"2\") { |c| }\n",
    )?;
    // Uncompressed: a second instead of a minute, and the box never leaves this machine.
    exec(
        Command::new("tar")
            .arg("-C")
            .arg(&box_dir)
            .arg("-cf")
            .arg(&box_file)
            .args(["metadata.json", "Vagrantfile", "box.img"]),
    )?;
    fs::remove_dir_all(&rootfs)?;
    fs::remove_dir_all(&box_dir)?;
    fs::write(&stamp, recipe)?;
    Ok(box_file)
}

/// Makes the tree a Vagrant base box.
fn configure(root: &Path) -> Result<()> {
    let write = |path: &str, text: &str| -> Result<()> {
        let path = root.join(path.trim_start_matches('/'));
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))
    };
    write("/etc/hostname", "vagrant-debian12\n")?;
    write(
        "/etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 vagrant-debian12\n",
    )?;
    write(
        "/etc/network/interfaces",
        "auto lo\niface lo inet loopback\nallow-hotplug eth0\niface eth0 inet dhcp\n",
    )?;
    chroot(
        root,
        "id vagrant >/dev/null 2>&1 || useradd -m -s /bin/bash vagrant; \
         echo vagrant:vagrant | chpasswd; echo root:vagrant | chpasswd",
    )?;
    let key = vagrant_insecure_key()?;
    let ssh_dir = root.join("home/vagrant/.ssh");
    fs::create_dir_all(&ssh_dir)?;
    fs::copy(&key, ssh_dir.join("authorized_keys"))?;
    chroot(
        root,
        "chown -R vagrant:vagrant /home/vagrant/.ssh && chmod 700 /home/vagrant/.ssh \
         && chmod 600 /home/vagrant/.ssh/authorized_keys",
    )?;
    write("/etc/sudoers.d/vagrant", "vagrant ALL=(ALL) NOPASSWD:ALL\n")?;
    write("/etc/ssh/sshd_config.d/vagrant.conf", "UseDNS no\n")?;
    // Host keys are made at first boot, so that every VM has its own.
    chroot(
        root,
        "chmod 440 /etc/sudoers.d/vagrant && rm -f /etc/ssh/ssh_host_*",
    )?;
    write(
        "/etc/systemd/system/regen-ssh-keys.service",
        "[Unit]\nDescription=Generate SSH host keys if missing\nBefore=ssh.service\n\
         ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key\n\
         [Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\
         [Install]\nWantedBy=multi-user.target\n",
    )?;
    chroot(
        root,
        "systemctl enable regen-ssh-keys.service && apt-get clean && : > /etc/machine-id",
    )
}

fn chroot(root: &Path, script: &str) -> Result<()> {
    exec(
        Command::new("chroot")
            .arg(root)
            .args(["/bin/sh", "-c", script]),
    )
}

/// The public half of the key Vagrant logs in with the first time (it then replaces it).
fn vagrant_insecure_key() -> Result<PathBuf> {
    let gems = Path::new("/usr/share/rubygems-integration/all/gems");
    let entries =
        fs::read_dir(gems).with_context(|| format!("failed to read {}", gems.display()))?;
    for entry in entries.flatten() {
        let key = entry.path().join("keys/vagrant.pub");
        if entry.file_name().to_string_lossy().starts_with("vagrant-") && key.is_file() {
            return Ok(key);
        }
    }
    bail!(
        "Vagrant's insecure public key (keys/vagrant.pub) not found under {}",
        gems.display()
    )
}

/// A bootable qcow2 of the tree. The partition is reached through a loop device at its offset,
/// which works where the kernel does not scan partitions of loop devices.
fn make_disk(root: &Path, image: &Path) -> Result<()> {
    let raw = image.with_extension("raw");
    let _ = fs::remove_file(&raw);
    exec(Command::new("truncate").args(["-s", DISK_SIZE]).arg(&raw))?;
    exec(Command::new("sh").arg("-c").arg(format!(
        "echo 'start=2048, type=83, bootable' | sfdisk -q '{}'",
        raw.display()
    )))?;
    let start = 2048 * 512;
    let size = fs::metadata(&raw)?.len() - start;
    let out = Command::new("losetup")
        .args(["-f", "--show", "-o", &start.to_string(), "--sizelimit"])
        .arg(size.to_string())
        .arg(&raw)
        .output()
        .context("failed to run losetup")?;
    if !out.status.success() {
        bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let loop_dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mount_point = image.with_extension("mnt");
    fs::create_dir_all(&mount_point)?;
    let result = fill_partition(root, &loop_dev, &mount_point);
    let _ = Command::new("umount").arg(&mount_point).status();
    let _ = Command::new("losetup").args(["-d", &loop_dev]).status();
    let _ = fs::remove_dir(&mount_point);
    result?;
    exec(
        Command::new("dd")
            .arg("if=/usr/lib/syslinux/mbr/mbr.bin")
            .arg(format!("of={}", raw.display()))
            .args(["bs=440", "count=1", "conv=notrunc", "status=none"]),
    )?;
    exec(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(image),
    )?;
    fs::remove_file(&raw)?;
    Ok(())
}

fn fill_partition(root: &Path, loop_dev: &str, mount_point: &Path) -> Result<()> {
    exec(Command::new("mkfs.ext4").args(["-q", "-L", "root", "-O", "^64bit", loop_dev]))?;
    exec(Command::new("mount").arg(loop_dev).arg(mount_point))?;
    exec(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", root.display()))
            .arg(mount_point),
    )?;
    let out = Command::new("blkid")
        .args(["-s", "UUID", "-o", "value", loop_dev])
        .output()
        .context("failed to run blkid")?;
    let uuid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if uuid.is_empty() {
        bail!("blkid found no UUID on {loop_dev}");
    }
    fs::write(
        mount_point.join("etc/fstab"),
        format!("UUID={uuid} / ext4 errors=remount-ro 0 1\n"),
    )?;
    let extlinux = mount_point.join("boot/extlinux");
    fs::create_dir_all(&extlinux)?;
    fs::write(
        extlinux.join("extlinux.conf"),
        format!(
            "DEFAULT debian\nTIMEOUT 1\nSERIAL 0 115200\nLABEL debian\n  LINUX /vmlinuz\n  \
             INITRD /initrd.img\n  APPEND root=UUID={uuid} ro console=tty0 console=ttyS0,115200 \
             net.ifnames=0 biosdevname=0\n"
        ),
    )?;
    exec(Command::new("extlinux").arg("--install").arg(&extlinux))?;
    exec(&mut Command::new("sync"))
}
