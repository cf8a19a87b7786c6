//! The bare relay: one more process between the client and the worker that does nothing but
//! copy bytes, a TCP connection on one side and the worker's pipes on the other, with a blocking
//! thread per direction. What it adds to a request and to a token is the least any process in
//! that place can add on this machine (two more wake-ups, a pipe read and a TCP write per
//! token), so it is the floor to read the supervisor's figures against.
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::FromRawFd;

use anyhow::Result;

/// Runs in the relay process: stdin is the worker's stdout, stdout the worker's stdin. Listens
/// on a free loopback port, says which on stderr, serves one connection and exits when the
/// client closes it (which closes the worker's stdin, and the worker exits).
pub fn child() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    eprintln!("{}", listener.local_addr()?.port());
    let (socket, _) = listener.accept()?;
    socket.set_nodelay(true)?;
    // Unbuffered ends: std's stdout is line-buffered and its stdin buffered.
    // SAFETY: fds 0 and 1 are open for the life of this process and owned by nothing else here.
    let (worker_out, mut worker_in) = unsafe { (File::from_raw_fd(0), File::from_raw_fd(1)) };
    let mut down = socket.try_clone()?;
    std::thread::spawn(move || copy(worker_out, &mut down));
    copy(socket, &mut worker_in);
    std::process::exit(0)
}

/// Every read written out whole, at once, until either side closes. Not `std::io::copy`: on
/// Linux it moves a pipe's bytes to a socket inside the kernel (splice), which a process that has
/// to read what it forwards, as the supervisor does, cannot.
fn copy(mut from: impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
