//! Helpers for end-to-end tests that run the real `tessera-server` and `tessera-agent`
//! binaries: where the binaries are, a free port, and child processes that are killed on drop
//! with their stderr kept in a log file for diagnosis.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The path of a workspace binary next to the running test (`target/<profile>/<name>`), or an
/// error saying how to build it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    // target/debug/deps/<this test> -> target/debug/<name>
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not built: run `cargo build -p tessera-server -p tessera-agent`",
        path.display()
    );
    Ok(path)
}

/// The path `name` would have next to the running executable (the load generator finds the
/// server and agent binaries of its own build profile there); whether it exists is checked
/// where it is started, with an error that says how to build it.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A TCP port free on 127.0.0.1 when asked (another process may take it before it is used).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed (SIGKILL) on drop, its stderr in a log file.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Spawns `command` with stdout discarded and stderr written to `log`.
    pub fn spawn(command: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)?;
        let child = command.stdout(Stdio::null()).stderr(file).spawn()?;
        Ok(Self { child, log })
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited, and its status if so.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// What the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
