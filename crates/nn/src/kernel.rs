//! The OpenBLAS kernel a run computes with. A product's last bits depend on the kernel, so it
//! is part of the run: chosen once (`fit.kernel`, "auto" picks the best this CPU runs),
//! written into the run's job file, and used by every process of the run. OpenBLAS reads its
//! kernel (`OPENBLAS_CORETYPE`) when it is loaded, before `main`, so a process that needs
//! another one executes itself again with it set (`pin`).

use std::fmt;

/// An OpenBLAS kernel dtrain pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX2 and FMA: any x86-64 CPU since 2013 (a mixed fleet pins this one).
    Haswell,
    /// AVX-512: about 1.5x Haswell's single-precision products where the CPU has it.
    SkylakeX,
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Kernel {
    /// Every kernel, best first.
    pub const ALL: [Kernel; 2] = [Kernel::SkylakeX, Kernel::Haswell];

    /// The name in the job file.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Haswell => "haswell",
            Kernel::SkylakeX => "skylakex",
        }
    }

    /// OpenBLAS's name for it (`OPENBLAS_CORETYPE`).
    pub fn coretype(self) -> &'static str {
        match self {
            Kernel::Haswell => "Haswell",
            Kernel::SkylakeX => "SkylakeX",
        }
    }

    /// The CPU features it needs.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            Kernel::Haswell => &["avx2", "fma"],
            Kernel::SkylakeX => &["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"],
        }
    }

    /// `fit.kernel`: `auto` (`None`) or a kernel's name.
    pub fn parse(s: &str) -> Result<Option<Kernel>, String> {
        if s == "auto" {
            return Ok(None);
        }
        Kernel::ALL.into_iter().find(|k| k.name() == s).map(Some).ok_or_else(|| {
            let names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
            format!("{s:?} is not a BLAS kernel (auto, {})", names.join(", "))
        })
    }

    /// The first feature it needs that a CPU with features `has` lacks.
    pub fn missing(self, has: &dyn Fn(&str) -> bool) -> Option<&'static str> {
        self.features().iter().copied().find(|f| !has(f))
    }
}

/// The kernel a run uses on a CPU with features `has`: `setting` if the CPU runs it, the best
/// one it runs for `auto`; `None` when it runs none of them (OpenBLAS then picks its own).
/// `Err` names the missing feature and what would work.
pub fn resolve(setting: Option<Kernel>, has: &dyn Fn(&str) -> bool) -> Result<Option<Kernel>, String> {
    match setting {
        None => Ok(Kernel::ALL.into_iter().find(|k| k.missing(has).is_none())),
        Some(k) => match k.missing(has) {
            None => Ok(Some(k)),
            Some(f) => {
                let here = Kernel::ALL.into_iter().find(|k| k.missing(has).is_none());
                let instead = here.map_or("none of dtrain's kernels runs here".into(), |h| {
                    format!("a run with fit.kernel = \"{h}\" runs here")
                });
                Err(format!("this CPU lacks {f}, which the run's BLAS kernel {k} needs; {instead}"))
            }
        },
    }
}

/// Whether this CPU has `feature` (a name as `Kernel::features` spells it).
pub fn cpu_has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        match feature {
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "avx512f" => has!("avx512f"),
            "avx512cd" => has!("avx512cd"),
            "avx512bw" => has!("avx512bw"),
            "avx512dq" => has!("avx512dq"),
            "avx512vl" => has!("avx512vl"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

/// The kernel this process was started with, if it was pinned to one of dtrain's.
pub fn pinned() -> Option<Kernel> {
    let set = std::env::var("OPENBLAS_CORETYPE").ok()?;
    Kernel::ALL.into_iter().find(|k| k.coretype() == set)
}

/// Makes this process compute with `kernel` (and one BLAS thread, since every shard runs with
/// one and OpenBLAS's idle pool threads otherwise spin on `sched_yield`, taking a core from
/// the shard threads): if the environment does not say so already, executes this program
/// again with it set. Returns only if nothing needed doing or the exec failed (then OpenBLAS's
/// choices stand, with a warning).
pub fn pin(kernel: Option<Kernel>) {
    use std::os::unix::process::CommandExt;
    let mut set: Vec<(&str, &str)> = Vec::new();
    if let Some(k) = kernel.filter(|&k| pinned() != Some(k)) {
        set.push(("OPENBLAS_CORETYPE", k.coretype()));
    }
    if std::env::var_os("OPENBLAS_NUM_THREADS").is_none() {
        set.push(("OPENBLAS_NUM_THREADS", "1"));
    }
    let Ok(exe) = std::env::current_exe() else { return };
    if set.is_empty() {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe).arg0(arg0).args(args).envs(set.iter().copied()).exec();
    eprintln!("warning: could not restart with {set:?} ({err}); using OpenBLAS's defaults");
}

extern "C" {
    fn openblas_get_corename() -> *const std::ffi::c_char;
}

/// The kernel OpenBLAS actually runs, by its own name (e.g. "SkylakeX").
pub fn running() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string inside OpenBLAS (or null).
    let name = unsafe { openblas_get_corename() };
    if name.is_null() {
        return "unknown".into();
    }
    // SAFETY: non-null, NUL-terminated, static for the life of the process.
    unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(features: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |f| features.contains(&f)
    }

    #[test]
    fn auto_picks_the_best_kernel_the_cpu_runs_and_a_fixed_one_needs_its_features() {
        let avx512 = cpu(&["avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"]);
        let avx2 = cpu(&["avx2", "fma"]);
        let old = cpu(&["sse4.2"]);
        assert_eq!(resolve(None, &avx512), Ok(Some(Kernel::SkylakeX)));
        assert_eq!(resolve(None, &avx2), Ok(Some(Kernel::Haswell)));
        assert_eq!(resolve(None, &old), Ok(None));
        assert_eq!(resolve(Some(Kernel::Haswell), &avx512), Ok(Some(Kernel::Haswell)));
        let e = resolve(Some(Kernel::SkylakeX), &avx2).unwrap_err();
        assert_eq!(
            e,
            "this CPU lacks avx512f, which the run's BLAS kernel skylakex needs; a run with fit.kernel = \"haswell\" runs here"
        );
        assert!(resolve(Some(Kernel::Haswell), &old).unwrap_err().contains("lacks avx2"));
    }

    #[test]
    fn names_parse() {
        assert_eq!(Kernel::parse("auto"), Ok(None));
        assert_eq!(Kernel::parse("skylakex"), Ok(Some(Kernel::SkylakeX)));
        assert_eq!(Kernel::parse("Haswell").unwrap_err(), "\"Haswell\" is not a BLAS kernel (auto, skylakex, haswell)");
    }
}
