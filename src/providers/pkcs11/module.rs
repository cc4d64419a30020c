//! The process-wide registry of loaded PKCS#11 modules. A module may be C_Initialize'd only once
//! per process, yet several roots, the CLI's checks, tests and benches may all use the same one:
//! they all get their handle here. Modules are never C_Finalize'd; they live as long as the
//! process. Blocking (dlopen, C_Initialize): call from a blocking context.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// The loaded and initialised module at `path`, loading it on first use. Paths are
/// canonicalised first, so a symlink (Debian's `/usr/lib/softhsm/libsofthsm2.so`) and its target
/// share one entry, as they share one library image in the process.
pub fn module(path: &Path) -> Result<Pkcs11, String> {
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| format!("PKCS#11 module {}: {e}", path.display()))?;
    // A poisoned lock only means another thread panicked while loading; the map is still sound.
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(m) = modules.get(&canonical) {
        return Ok(m.clone());
    }
    let m = Pkcs11::new(&canonical)
        .map_err(|e| format!("cannot load PKCS#11 module {}: {e}", path.display()))?;
    match m.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another library in this process (not this registry) initialised it first: usable.
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(format!(
                "PKCS#11 module {}: C_Initialize failed: {e}",
                path.display()
            ));
        }
    }
    modules.insert(canonical, m.clone());
    Ok(m)
}
