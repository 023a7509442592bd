//! Bench records and their outputs: the table, JSON, CSV, the plot, and `compare`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One measurement: one kernel (or the whole layer) at one token count on one backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub backend: String,
    pub preset: String,
    pub dtype: String,
    pub tokens: usize,
    pub kernel: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub gflops: f64,
    pub gbps: f64,
    /// Roofline bound (max of FLOPs / GEMM peak, bytes / bandwidth) over the median time.
    pub roofline_fraction: f64,
    /// What the times were read from: `device` (CUDA events, WebGPU timestamp queries: the work on
    /// the device only) or `wall` (the host clock around the call and the wait for its work).
    /// Records without it (older files, the PyTorch baseline) were timed with the wall clock.
    #[serde(default = "wall")]
    pub clock: String,
}

fn wall() -> String {
    Clock::Wall.name().to_string()
}

/// The clock a measurement was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The backend's device clock ([`moe_hal::Backend::device_time_ms`]).
    Device,
    /// The host's monotonic clock around the call and the wait for its work.
    Wall,
}

impl Clock {
    pub fn name(self) -> &'static str {
        match self {
            Clock::Device => "device",
            Clock::Wall => "wall",
        }
    }
}

/// The ceilings measured on one backend.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    pub gemm_gflops: f64,
    pub gemv_gbps: f64,
    pub copy_gbps: f64,
    /// The larger of the two bandwidth measurements.
    pub bandwidth_gbps: f64,
    /// The clock of the ceiling runs: the backend's kernels are timed with the same one.
    pub clock: Clock,
}

impl Ceilings {
    /// The better of each measurement in `self` and `other`.
    pub fn best(&self, other: &Ceilings) -> Ceilings {
        let (gemv_gbps, copy_gbps) = (self.gemv_gbps.max(other.gemv_gbps), self.copy_gbps.max(other.copy_gbps));
        Ceilings {
            gemm_gflops: self.gemm_gflops.max(other.gemm_gflops),
            gemv_gbps,
            copy_gbps,
            bandwidth_gbps: gemv_gbps.max(copy_gbps),
            clock: if self.clock == other.clock {
                self.clock
            } else {
                Clock::Wall
            },
        }
    }
}

pub const COLUMNS: [&str; 12] = [
    "backend",
    "preset",
    "dtype",
    "tokens",
    "kernel",
    "median_ms",
    "min_ms",
    "max_ms",
    "gflops",
    "gbps",
    "roofline_fraction",
    "clock",
];

fn kernel_order(k: &str) -> usize {
    crate::bench::KERNELS
        .iter()
        .position(|&x| x == k)
        .unwrap_or(crate::bench::KERNELS.len())
}

fn sorted(records: &[Record]) -> Vec<&Record> {
    let mut v: Vec<&Record> = records.iter().collect();
    v.sort_by(|a, b| {
        (&a.backend, a.tokens, kernel_order(&a.kernel)).cmp(&(&b.backend, b.tokens, kernel_order(&b.kernel)))
    });
    v
}

/// A readable table, one line per record, sorted by backend, tokens, kernel, and a
/// footnote naming the clock of each backend's times.
pub fn table(records: &[Record]) -> String {
    let mut s = format!(
        "{:<7} {:>6}  {:<13} {:>11} {:>11} {:>11} {:>9} {:>8} {:>9}\n",
        "backend", "tokens", "kernel", "median ms", "min ms", "max ms", "GFLOP/s", "GB/s", "roofline"
    );
    for r in sorted(records) {
        s += &format!(
            "{:<7} {:>6}  {:<13} {:>11.4} {:>11.4} {:>11.4} {:>9.1} {:>8.1} {:>8.1}%\n",
            r.backend,
            r.tokens,
            r.kernel,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.gflops,
            r.gbps,
            100.0 * r.roofline_fraction
        );
    }
    // backend -> the clocks of its records (one, unless a device clock failed on some runs).
    let mut clocks: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in records {
        let c = clocks.entry(r.backend.as_str()).or_default();
        if !c.contains(&r.clock.as_str()) {
            c.push(r.clock.as_str());
        }
    }
    let notes: Vec<String> = clocks
        .iter()
        .map(|(backend, c)| format!("{backend} {}", c.join("+")))
        .collect();
    s += &format!(
        "clock: {} (device: CUDA events / WebGPU timestamps around the work; wall: host clock around the call and the wait)\n",
        notes.join(", ")
    );
    s
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot move the output into {}: {e}", path.display())
    })
}

pub fn write_json(path: &Path, records: &[Record]) -> Result<(), String> {
    let text = serde_json::to_string_pretty(&sorted(records)).map_err(|e| format!("JSON: {e}"))?;
    write_atomic(path, (text + "\n").as_bytes())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn write_csv(path: &Path, records: &[Record]) -> Result<(), String> {
    let mut s = COLUMNS.join(",") + "\n";
    for r in sorted(records) {
        s += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}\n",
            csv_field(&r.backend),
            csv_field(&r.preset),
            csv_field(&r.dtype),
            r.tokens,
            csv_field(&r.kernel),
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.gflops,
            r.gbps,
            r.roofline_fraction,
            csv_field(&r.clock)
        );
    }
    write_atomic(path, s.as_bytes())
}

/// `Ok` for a `.svg` or `.png` path.
pub fn check_plot_path(path: &Path) -> Result<(), String> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
    {
        Some(e) if e == "svg" || e == "png" => Ok(()),
        _ => Err(format!(
            "--plot {}: expected a file name ending in .svg or .png",
            path.display()
        )),
    }
}

/// DejaVu Sans (license: `assets/DejaVuSans-LICENSE.txt`): plots need a font to lay out text, and
/// PNG plots to draw it; embedding one keeps them free of system fonts and font libraries.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers [`FONT`] as plotters' `sans-serif` (once per process).
fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT)
                .map_err(|_| "the embedded plot font (DejaVu Sans) cannot be read".to_string())
        })
        .clone()
}

/// Time per token count, log-log, one solid line per backend and kernel and
/// its roofline bound dashed in the same colour. SVG and PNG plots carry the
/// same text (title, axis labels, tick labels, legend), set in the embedded
/// DejaVu Sans and rasterised by the pure-Rust `ab_glyph` for PNG.
pub fn write_plot(path: &Path, records: &[Record]) -> Result<(), String> {
    check_plot_path(path)?;
    if records.is_empty() {
        return Err("nothing to plot".into());
    }
    register_font()?;
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} is not a file path", path.display()))?;
    // The temporary name keeps the extension: the bitmap encoder picks the format by it.
    let tmp = path.with_file_name(format!(".tmp-{}-{}", std::process::id(), name.to_string_lossy()));
    let png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let result = if png {
        draw(plotters::prelude::BitMapBackend::new(&tmp, (1200, 800)), records)
    } else {
        draw(plotters::prelude::SVGBackend::new(&tmp, (1200, 800)), records)
    };
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot draw {}: {e}", path.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot move the plot into {}: {e}", path.display())
    })
}

type Series = BTreeMap<(String, usize, String), Vec<(f64, f64, f64)>>;

fn draw<DB: plotters::prelude::DrawingBackend>(backend: DB, records: &[Record]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    use plotters::prelude::*;
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    // (backend, kernel order, kernel) -> [(tokens, median ms, bound ms)]
    let mut series: Series = BTreeMap::new();
    for r in records {
        series
            .entry((r.backend.clone(), kernel_order(&r.kernel), r.kernel.clone()))
            .or_default()
            .push((r.tokens as f64, r.median_ms, r.roofline_fraction * r.median_ms));
    }
    for v in series.values_mut() {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let pos = |x: f64| x.is_finite() && x > 0.0;
    let xs = records.iter().map(|r| r.tokens as f64);
    let ys = series.values().flatten().flat_map(|p| [p.1, p.2]).filter(|&y| pos(y));
    let (xmin, xmax) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (ymin, ymax) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    if ymin > ymax {
        return Err("no positive time to plot".into());
    }
    let (xmin, xmax) = (xmin.max(1.0) / 1.5, xmax.max(1.0) * 1.5);
    let (ymin, ymax) = (ymin / 2.0, ymax * 2.0);

    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let first = &records[0];
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .caption(
            format!(
                "{} {}: time per call (solid) and roofline bound (dashed)",
                first.preset, first.dtype
            ),
            ("sans-serif", 24),
        )
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())
        .map_err(e)?;
    chart.configure_mesh().x_desc("tokens").y_desc("ms").draw().map_err(e)?;
    for (n, ((backend, _, kernel), pts)) in series.iter().enumerate() {
        let colour = Palette99::pick(n).to_rgba();
        let style = colour.stroke_width(2);
        let line = chart
            .draw_series(LineSeries::new(
                pts.iter().filter(|p| pos(p.1)).map(|p| (p.0, p.1)),
                style,
            ))
            .map_err(e)?;
        line.label(format!("{backend} {kernel}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(
                pts.iter().filter(|p| pos(p.2)).map(|p| (p.0, p.2)),
                6,
                4,
                colour.stroke_width(1),
            ))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

fn read_records(path: &Path) -> Result<Vec<Record>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not a moe-bench JSON array of records ({})",
            path.display(),
            e.to_string().replace('\n', " ")
        )
    })
}

/// The pairs of backends whose records [`compare`] matches: every backend of the other file
/// against the one backend of a file that has one (a PyTorch baseline against each backend of a
/// run, say), otherwise each backend against the same backend in the other file.
fn backend_pairs(ba: &[String], bb: &[String]) -> Vec<(String, String)> {
    if ba.len() == 1 || bb.len() == 1 {
        ba.iter()
            .flat_map(|x| bb.iter().map(move |y| (x.clone(), y.clone())))
            .collect()
    } else {
        ba.iter()
            .filter(|x| bb.contains(x))
            .map(|x| (x.clone(), x.clone()))
            .collect()
    }
}

/// What [`compare`] matches records on: preset, dtype, tokens, kernel (in table order).
type Key = (String, String, usize, usize, String);

fn key(r: &Record) -> Key {
    (
        r.preset.clone(),
        r.dtype.clone(),
        r.tokens,
        kernel_order(&r.kernel),
        r.kernel.clone(),
    )
}

/// Records by backend, then by [`Key`]; the repeats of a key within a backend are counted, not kept.
type ByBackend<'a> = BTreeMap<String, BTreeMap<Key, &'a Record>>;

fn index(rs: &[Record]) -> (ByBackend<'_>, usize) {
    let mut by = ByBackend::new();
    let mut repeats = 0usize;
    for r in rs {
        let m = by.entry(r.backend.clone()).or_default();
        match m.entry(key(r)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(r);
            }
            std::collections::btree_map::Entry::Occupied(_) => repeats += 1,
        }
    }
    (by, repeats)
}

/// Prints records of `a` and `b` side by side, matched on (preset, dtype, tokens, kernel) for
/// each pair of backends of [`backend_pairs`]; says how many records found no match and how many
/// repeated another one of their file (the first of them is shown).
pub fn compare(a: &Path, b: &Path) -> Result<(), String> {
    let ra = read_records(a)?;
    let rb = read_records(b)?;
    let ((ma, rep_a), (mb, rep_b)) = (index(&ra), index(&rb));
    let names = |m: &ByBackend| m.keys().cloned().collect::<Vec<_>>();
    let pairs = backend_pairs(&names(&ma), &names(&mb));
    let mut matched: Vec<(&Record, &Record)> = Vec::new();
    let (mut used_a, mut used_b) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for (x, y) in &pairs {
        for (k, r) in &ma[x] {
            if let Some(q) = mb[y].get(k) {
                matched.push((*r, *q));
                used_a.insert((x.clone(), k.clone()));
                used_b.insert((y.clone(), k.clone()));
            }
        }
    }
    if matched.is_empty() {
        return Err(format!(
            "{} and {} have no (preset, dtype, tokens, kernel) in common{}",
            a.display(),
            b.display(),
            if pairs.is_empty() {
                format!(
                    " for any backend: A has {}, B has {} (files of several backends each are matched backend by backend)",
                    names(&ma).join(", "),
                    names(&mb).join(", ")
                )
            } else {
                String::new()
            }
        ));
    }
    println!("A = {}\nB = {}", a.display(), b.display());
    println!(
        "{:<24} {:<5} {:>6}  {:<13} {:>18} {:>18} {:>8}",
        "preset", "dtype", "tokens", "kernel", "A median ms", "B median ms", "B/A"
    );
    for (x, y) in &matched {
        let ratio = if x.median_ms > 0.0 {
            format!("{:.3}", y.median_ms / x.median_ms)
        } else {
            "-".into()
        };
        println!(
            "{:<24} {:<5} {:>6}  {:<13} {:>18} {:>18} {:>8}",
            x.preset,
            x.dtype,
            x.tokens,
            x.kernel,
            format!("{:.4} {}", x.median_ms, x.backend),
            format!("{:.4} {}", y.median_ms, y.backend),
            ratio
        );
    }
    let mixed = matched.iter().filter(|(x, y)| x.clock != y.clock).count();
    if mixed > 0 {
        println!(
            "note: {mixed} of these pairs were timed with different clocks (device in one file, wall in the other): \
             device times leave out the host overhead that wall times include"
        );
    }
    let count = |m: &ByBackend| m.values().map(|v| v.len()).sum::<usize>();
    let only_a = count(&ma) - used_a.len();
    let only_b = count(&mb) - used_b.len();
    if only_a + only_b > 0 {
        println!("{} records only in A, {} only in B (not shown)", only_a, only_b);
    }
    if rep_a + rep_b > 0 {
        println!(
            "{rep_a} records of A and {rep_b} of B repeat an earlier record of their file (same backend, preset, dtype, tokens and kernel): the first of each is shown"
        );
    }
    Ok(())
}
