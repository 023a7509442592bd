//! Run-time probe of a CANN install: which libraries load, which runtime
//! symbols and which operator symbol pairs they export.
//!
//! Nothing found is ever called: symbols are only looked up. The probe keeps
//! the loaded libraries so that the implementation that fills the slot can
//! take its function pointers from them.

use crate::ops::{
    self, SlotKernel, ASCENDCL_LIB, ASCENDCL_SYMBOLS, NNOPBASE_LIB, NNOPBASE_SYMBOLS, OPAPI_LIB, OPAPI_TRANSFORMER_LIB,
    OPERATOR_LIBS,
};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Install prefix used when neither environment variable is set.
pub const DEFAULT_TOOLKIT: &str = "/usr/local/Ascend/ascend-toolkit/latest";

/// Libraries probed, in load order: the runtime first, so that the operator
/// libraries' own dependencies on it resolve to the copy already loaded.
pub const LIBRARIES: [&str; 4] = [ASCENDCL_LIB, NNOPBASE_LIB, OPAPI_TRANSFORMER_LIB, OPAPI_LIB];

/// One folder the probe looked in, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchDir {
    pub path: PathBuf,
    /// `ASCEND_HOME_PATH`, `ASCEND_TOOLKIT_HOME`, `default prefix` or `given`.
    pub source: &'static str,
}

/// What happened to one library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryStatus {
    pub name: &'static str,
    /// Where the file was found (first folder that has it).
    pub path: Option<PathBuf>,
    /// The loader's error when the file exists but did not load.
    pub load_error: Option<String>,
}

impl LibraryStatus {
    pub fn loaded(&self) -> bool {
        self.path.is_some() && self.load_error.is_none()
    }
}

/// One looked-up symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolStatus {
    pub name: String,
    /// The library that exports it, if any did.
    pub library: Option<&'static str>,
}

impl SymbolStatus {
    pub fn found(&self) -> bool {
        self.library.is_some()
    }
}

/// The two symbols of one `aclnn` operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpSymbols {
    pub op: &'static str,
    pub get_workspace_size: SymbolStatus,
    pub run: SymbolStatus,
}

impl OpSymbols {
    /// Both phases are exported: the operator can be called.
    pub fn resolved(&self) -> bool {
        self.get_workspace_size.found() && self.run.found()
    }

    /// The symbols of the pair that are missing.
    pub fn missing(&self) -> Vec<&str> {
        [&self.get_workspace_size, &self.run]
            .into_iter()
            .filter(|s| !s.found())
            .map(|s| s.name.as_str())
            .collect()
    }
}

/// The probe's result for one row of the operator map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpStatus {
    pub kernel: SlotKernel,
    /// Preferred operator first, then the fallbacks.
    pub candidates: Vec<OpSymbols>,
    pub helpers: Vec<OpSymbols>,
}

impl OpStatus {
    /// The first candidate whose two symbols are both exported.
    pub fn resolved(&self) -> Option<&'static str> {
        self.candidates.iter().find(|c| c.resolved()).map(|c| c.op)
    }

    /// Helper operators that are not exported.
    pub fn missing_helpers(&self) -> Vec<&'static str> {
        self.helpers.iter().filter(|h| !h.resolved()).map(|h| h.op).collect()
    }
}

/// The loaded libraries, kept for the implementation that calls into them.
pub struct Libraries {
    pub ascendcl: Option<libloading::Library>,
    pub nnopbase: Option<libloading::Library>,
    /// `libopapi_transformer.so`, then `libopapi.so`, whichever loaded.
    pub operators: Vec<(&'static str, libloading::Library)>,
}

/// What a CANN install offers this process.
#[derive(Clone)]
pub struct Probe {
    pub search: Vec<SearchDir>,
    pub libraries: Vec<LibraryStatus>,
    /// `libascendcl.so` and `libnnopbase.so` entry points.
    pub runtime_symbols: Vec<SymbolStatus>,
    /// One per row of [`ops::OP_MAP`], in the same order.
    pub ops: Vec<OpStatus>,
    /// `version=` of the toolkit's `ascend_toolkit_install.info`, when found.
    pub toolkit_version: Option<String>,
    loaded: Arc<Libraries>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("search", &self.search)
            .field("libraries", &self.libraries)
            .field("runtime_symbols", &self.runtime_symbols)
            .field("ops", &self.ops)
            .field("toolkit_version", &self.toolkit_version)
            .finish_non_exhaustive()
    }
}

/// The `lib64` folders to search, from the values of `ASCEND_HOME_PATH` and
/// `ASCEND_TOOLKIT_HOME` (in that order), then the default prefix.
pub fn search_dirs(ascend_home: Option<OsString>, toolkit_home: Option<OsString>) -> Vec<SearchDir> {
    let mut dirs: Vec<SearchDir> = Vec::new();
    let mut push = |root: PathBuf, source: &'static str| {
        let path = root.join("lib64");
        if !dirs.iter().any(|d| d.path == path) {
            dirs.push(SearchDir { path, source });
        }
    };
    for (value, source) in [(ascend_home, "ASCEND_HOME_PATH"), (toolkit_home, "ASCEND_TOOLKIT_HOME")] {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            push(PathBuf::from(v), source);
        }
    }
    push(PathBuf::from(DEFAULT_TOOLKIT), "default prefix");
    dirs
}

impl Probe {
    /// Probes the folders named by the environment (see [`search_dirs`]).
    pub fn run() -> Probe {
        let dirs = search_dirs(
            std::env::var_os("ASCEND_HOME_PATH"),
            std::env::var_os("ASCEND_TOOLKIT_HOME"),
        );
        Probe::run_dirs(dirs)
    }

    /// Probes exactly these folders (each one holding the `.so` files).
    pub fn run_in(dirs: &[PathBuf]) -> Probe {
        Probe::run_dirs(
            dirs.iter()
                .map(|p| SearchDir {
                    path: p.clone(),
                    source: "given",
                })
                .collect(),
        )
    }

    /// A probe that looked nowhere: every library missing.
    pub fn empty() -> Probe {
        Probe::run_dirs(Vec::new())
    }

    fn run_dirs(search: Vec<SearchDir>) -> Probe {
        let mut libraries = Vec::new();
        let mut ascendcl = None;
        let mut nnopbase = None;
        let mut operators = Vec::new();
        for name in LIBRARIES {
            let path = search.iter().map(|d| d.path.join(name)).find(|p| p.is_file());
            let mut status = LibraryStatus {
                name,
                path: path.clone(),
                load_error: None,
            };
            if let Some(path) = path {
                match load(&path) {
                    Ok(lib) => match name {
                        ASCENDCL_LIB => ascendcl = Some(lib),
                        NNOPBASE_LIB => nnopbase = Some(lib),
                        _ => operators.push((name, lib)),
                    },
                    Err(e) => status.load_error = Some(e.to_string()),
                }
            }
            libraries.push(status);
        }
        let loaded = Libraries {
            ascendcl,
            nnopbase,
            operators,
        };

        let mut runtime_symbols = Vec::new();
        for (lib_name, lib, names) in [
            (ASCENDCL_LIB, &loaded.ascendcl, ASCENDCL_SYMBOLS),
            (NNOPBASE_LIB, &loaded.nnopbase, NNOPBASE_SYMBOLS),
        ] {
            for &name in names {
                let found = lib.as_ref().is_some_and(|l| has_symbol(l, name));
                runtime_symbols.push(SymbolStatus {
                    name: name.to_string(),
                    library: found.then_some(lib_name),
                });
            }
        }

        let lookup = |name: &str| SymbolStatus {
            name: name.to_string(),
            library: loaded
                .operators
                .iter()
                .find(|(_, l)| has_symbol(l, name))
                .map(|(n, _)| *n),
        };
        let op_symbols = |op: &'static str| OpSymbols {
            op,
            get_workspace_size: lookup(&ops::workspace_symbol(op)),
            run: lookup(op),
        };
        let op_status = ops::OP_MAP
            .iter()
            .map(|e| OpStatus {
                kernel: e.kernel,
                candidates: e.candidates().map(op_symbols).collect(),
                helpers: e.helpers.iter().map(|&h| op_symbols(h)).collect(),
            })
            .collect();

        let toolkit_version = libraries
            .iter()
            .filter_map(|l| l.path.as_deref())
            .find_map(|p| p.parent().and_then(toolkit_version_near));

        Probe {
            search,
            libraries,
            runtime_symbols,
            ops: op_status,
            toolkit_version,
            loaded: Arc::new(loaded),
        }
    }

    /// The libraries this probe loaded (for the implementation to call into).
    pub fn loaded(&self) -> &Arc<Libraries> {
        &self.loaded
    }

    pub fn library(&self, name: &str) -> Option<&LibraryStatus> {
        self.libraries.iter().find(|l| l.name == name)
    }

    /// Whether any CANN library was found at all.
    pub fn any_library_found(&self) -> bool {
        self.libraries.iter().any(|l| l.path.is_some())
    }

    /// Required libraries that did not load: the runtime, the tensor library,
    /// and at least one operator library.
    pub fn missing_libraries(&self) -> Vec<String> {
        let loaded = |n: &str| self.library(n).is_some_and(|l| l.loaded());
        let mut missing = Vec::new();
        for name in [ASCENDCL_LIB, NNOPBASE_LIB] {
            if !loaded(name) {
                missing.push(name.to_string());
            }
        }
        if !OPERATOR_LIBS.iter().any(|n| loaded(n)) {
            missing.push(format!("{OPAPI_LIB} (or {OPAPI_TRANSFORMER_LIB})"));
        }
        missing
    }

    /// Runtime symbols not exported by a library that did load.
    pub fn missing_runtime_symbols(&self) -> Vec<&str> {
        let loaded = |n: &str| self.library(n).is_some_and(|l| l.loaded());
        let lib_of = |s: &str| {
            if ASCENDCL_SYMBOLS.contains(&s) {
                ASCENDCL_LIB
            } else {
                NNOPBASE_LIB
            }
        };
        self.runtime_symbols
            .iter()
            .filter(|s| !s.found() && loaded(lib_of(&s.name)))
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Everything an implementation needs besides the operators is present.
    pub fn runtime_ready(&self) -> bool {
        self.missing_libraries().is_empty() && self.runtime_symbols.iter().all(|s| s.found())
    }

    /// Why the runtime cannot be used, naming what is missing and where the
    /// probe looked; `None` when [`Probe::runtime_ready`].
    pub fn unavailable_reason(&self) -> Option<String> {
        if self.runtime_ready() {
            return None;
        }
        let mut parts = Vec::new();
        let missing = self.missing_libraries();
        if !missing.is_empty() {
            parts.push(format!("CANN (Ascend) libraries not loaded: {}", missing.join(", ")));
        }
        for l in &self.libraries {
            if let (Some(p), Some(e)) = (&l.path, &l.load_error) {
                parts.push(format!("{} failed to load ({}: {e})", l.name, p.display()));
            }
        }
        let symbols = self.missing_runtime_symbols();
        if !symbols.is_empty() {
            parts.push(format!("CANN runtime symbols missing: {}", symbols.join(", ")));
        }
        let looked = if self.search.is_empty() {
            "no folder".to_string()
        } else {
            self.search
                .iter()
                .map(|d| format!("{} ({})", d.path.display(), d.source))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Some(format!(
            "{}; looked in {looked}; set ASCEND_HOME_PATH (source <toolkit>/set_env.sh) to select the CANN toolkit",
            parts.join("; ")
        ))
    }

    /// The probe's row for `kernel`.
    pub fn op(&self, kernel: SlotKernel) -> Option<&OpStatus> {
        self.ops.iter().find(|o| o.kernel == kernel)
    }

    /// The operator `kernel` would call: its first candidate with both symbols.
    pub fn resolved(&self, kernel: SlotKernel) -> Option<&'static str> {
        self.op(kernel).and_then(|o| o.resolved())
    }

    /// Whether operator `op` (any row, candidate or helper) has both symbols.
    pub fn op_available(&self, op: &str) -> bool {
        self.ops
            .iter()
            .flat_map(|o| o.candidates.iter().chain(o.helpers.iter()))
            .any(|c| c.op == op && c.resolved())
    }

    /// A report of the probe: folders, libraries, runtime symbols, version.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "search path:");
        if self.search.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        for d in &self.search {
            let there = if d.path.is_dir() { "" } else { "  [no such folder]" };
            let _ = writeln!(s, "  {} ({}){there}", d.path.display(), d.source);
        }
        let _ = writeln!(s, "libraries:");
        for l in &self.libraries {
            let state = match (&l.path, &l.load_error) {
                (None, _) => "missing".to_string(),
                (Some(p), None) => format!("loaded   {}", p.display()),
                (Some(p), Some(e)) => format!("FAILED   {} ({e})", p.display()),
            };
            let _ = writeln!(s, "  {:<26} {state}", l.name);
        }
        let found = self.runtime_symbols.iter().filter(|x| x.found()).count();
        let _ = writeln!(s, "runtime symbols: {found} of {} found", self.runtime_symbols.len());
        let missing = self.missing_runtime_symbols();
        if !missing.is_empty() {
            let _ = writeln!(s, "  missing: {}", missing.join(", "));
        }
        if [ASCENDCL_LIB, NNOPBASE_LIB]
            .iter()
            .any(|n| !self.library(n).is_some_and(|l| l.loaded()))
        {
            let _ = writeln!(s, "  (the symbols of a library that did not load are not looked up)");
        }
        let _ = writeln!(
            s,
            "toolkit version: {}",
            self.toolkit_version.as_deref().unwrap_or("unknown")
        );
        s
    }
}

/// Opens one library.
#[allow(unsafe_code)]
fn load(path: &Path) -> Result<libloading::Library, libloading::Error> {
    // SAFETY: loading a shared library runs its initialisers, which we cannot
    // check. We only load files with the CANN library names, from the folders
    // the user configured (ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME), the
    // documented install prefix, or folders a caller passed in explicitly.
    unsafe { libloading::Library::new(path) }
}

/// Whether `lib` exports `name`.
#[allow(unsafe_code)]
fn has_symbol(lib: &libloading::Library, name: &str) -> bool {
    // SAFETY: the symbol is only looked up, never called or dereferenced, so
    // the pointer type we name does not matter.
    unsafe { lib.get::<*const ()>(name.as_bytes()).is_ok() }
}

/// `version=` of an `ascend_toolkit_install.info` beside `lib_dir` (in its
/// parent, or in the parent's `<arch>-linux` folder).
fn toolkit_version_near(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    let mut candidates = vec![root.join("ascend_toolkit_install.info")];
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with("-linux") {
                candidates.push(e.path().join("ascend_toolkit_install.info"));
            }
        }
    }
    candidates.iter().find_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        text.lines()
            .find_map(|l| l.trim().strip_prefix("version="))
            .map(|v| v.trim().trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    })
}
