//! Replacing files the way real writers do: write a sibling and rename it over the old one
//! (cert-manager's csi driver, spiffe-helper, most scripts), or swap the `..data` symlink of a
//! Kubernetes Secret volume. Plus the log lines a reload produces.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::pki::Identity;

/// Replaces `path` in one step: writes a sibling temp file, then renames it over `path`.
pub fn atomic_write(path: &Path, contents: impl AsRef<[u8]>) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = path.file_name().expect("file name").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", N.fetch_add(1, Ordering::SeqCst)));
    std::fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), path.display()));
}

/// [`atomic_write`] with the contents of `from`.
pub fn atomic_copy(from: &Path, to: &Path) {
    let data = std::fs::read(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    atomic_write(to, data);
}

/// Replaces `path` (a file) with a symlink to a file that does not exist, in one step.
pub fn atomic_dangling_symlink(path: &Path) {
    let tmp = path.with_file_name(".dangling.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(path.with_file_name("no-such-file.pem"), &tmp)
        .expect("create dangling symlink");
    std::fs::rename(&tmp, path).expect("rename dangling symlink into place");
}

/// A certificate and key file pair that a test rotates in place.
pub struct LiveIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl LiveIdentity {
    /// `DIR/live-cert.pem` and `DIR/live-key.pem`, holding `id`.
    pub fn new(dir: &Path, id: &Identity) -> LiveIdentity {
        let live = LiveIdentity {
            cert: dir.join("live-cert.pem"),
            key: dir.join("live-key.pem"),
        };
        live.install(id);
        live
    }

    /// Certificate first, then key, each by atomic rename, with nothing in between.
    pub fn install(&self, id: &Identity) {
        atomic_copy(&id.cert, &self.cert);
        atomic_copy(&id.key, &self.key);
    }
}

/// A Kubernetes Secret volume: the files live in a timestamped directory `..GEN`; `..data`
/// points at it, and each visible name is a symlink `NAME -> ..data/NAME`. An update writes a
/// new `..GEN`, points a temporary symlink at it and renames that over `..data`, then removes
/// the old directory: no visible name ever changes, only what it resolves to.
pub struct SecretVolume {
    pub dir: PathBuf,
    generation: usize,
}

impl SecretVolume {
    pub fn new(dir: &Path, files: &[(&str, Vec<u8>)]) -> SecretVolume {
        std::fs::create_dir_all(dir).expect("create volume dir");
        let mut vol = SecretVolume {
            dir: dir.to_owned(),
            generation: 0,
        };
        let generation = vol.write_generation(files);
        std::os::unix::fs::symlink(&generation, dir.join("..data")).expect("symlink ..data");
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name))
                .expect("symlink file name into ..data");
        }
        vol
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write_generation(&mut self, files: &[(&str, Vec<u8>)]) -> String {
        self.generation += 1;
        let name = format!(
            "..2026_11_23_10_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        );
        let gen_dir = self.dir.join(&name);
        std::fs::create_dir(&gen_dir).expect("create generation dir");
        for (file, contents) in files {
            std::fs::write(gen_dir.join(file), contents).expect("write secret file");
        }
        name
    }

    /// The atomic update kubelet does.
    pub fn swap(&mut self, files: &[(&str, Vec<u8>)]) {
        let old = std::fs::read_link(self.dir.join("..data")).expect("read ..data");
        let new = self.write_generation(files);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &tmp).expect("symlink ..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("rename ..data_tmp over ..data");
        std::fs::remove_dir_all(self.dir.join(old)).expect("remove the old generation");
    }
}

/// The INFO line of a successful reload.
pub fn is_reloaded(line: &str) -> bool {
    line.contains("identity reloaded")
}

/// The WARN line of a failed reload.
pub fn is_reload_failed(line: &str) -> bool {
    line.contains("identity reload failed")
}
