//! The two bpf(2) commands aya 0.13 does not expose for cgroup links:
//! `BPF_LINK_CREATE` returning the link's fd, and `BPF_OBJ_PIN` of that fd.
//! (aya creates the same links internally but keeps their fds private, and
//! a cgroup link whose last fd closes detaches: it has to be pinned to
//! survive a ztunnel restart.)

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `union bpf_attr`, as the first 64 bytes; the kernel reads only the
/// fields of the command and requires nothing beyond them.
#[repr(C, align(8))]
struct Attr([u32; 16]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed; the
    // kernel reads it (and for these commands writes nothing back).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Attaches `prog` to `target` (a cgroup fd) with a BPF link.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 16]);
    attr.0[0] = prog.as_raw_fd() as u32; // link_create.prog_fd
    attr.0[1] = target.as_raw_fd() as u32; // link_create.target_fd
    attr.0[2] = attach_type; // link_create.attach_type
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the BPF object `fd` at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = Attr([0; 16]);
    let p = c.as_ptr() as u64;
    attr.0[0] = p as u32; // obj_pin.pathname (u64, little or big half first
    attr.0[1] = (p >> 32) as u32; // as the host orders a u64)
    if cfg!(target_endian = "big") {
        attr.0.swap(0, 1);
    }
    attr.0[2] = fd.as_raw_fd() as u32; // obj_pin.bpf_fd
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}
