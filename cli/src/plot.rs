//! SVG line plots, for `dmatx bench`: any number of named series of (x, y) points on a
//! log2 axis of byte sizes (512 B … 1 MiB) or a linear one, a linear y axis from zero, a
//! legend, and caption lines (the command that reproduces the figure).
//!
//! ```
//! use dmatx_cli::plot::{LinePlot, XAxis};
//!
//! let mut plot = LinePlot::new("Throughput", XAxis::Log2Bytes, "transfer size", "MB/s");
//! plot.add_series("sg", vec![(4096.0, 800.0), (65536.0, 2400.0)]);
//! plot.add_series("bounce", vec![(4096.0, 500.0), (65536.0, 1100.0)]);
//! plot.add_caption("dmatx bench --sizes 4K,64K");
//! assert!(plot.to_svg().starts_with("<svg"));
//! ```

use crate::render::{escape, nice_step};
use std::fmt::Write as _;

/// How the x axis maps values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// Log2 scale of byte counts, ticks at powers of two labelled `512 B`, `4 KiB`, `1 MiB`.
    Log2Bytes,
    /// Linear scale from the smallest to the largest x.
    Linear,
}

/// One named line.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Name in the legend.
    pub name: String,
    /// Points (x, y), drawn in x order.
    pub points: Vec<(f64, f64)>,
}

/// A line plot of any number of series.
#[derive(Clone, Debug)]
pub struct LinePlot {
    /// Title, at the top.
    pub title: String,
    /// A smaller line under the title.
    pub subtitle: String,
    /// Kind of x axis.
    pub x_axis: XAxis,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Small lines under the plot (how to reproduce it).
    pub caption: Vec<String>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels of the plotting area and axes (legend and caption add to it).
    pub height: u32,
}

/// Colours of the series, in order (Tableau 10); they repeat after ten series.
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
    "#ff9da7", "#bab0ac",
];

const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 50.0;

/// A byte count as `512 B`, `4 KiB`, `1.5 MiB`.
pub fn format_bytes(bytes: f64) -> String {
    let (value, unit) = if bytes >= (1u64 << 30) as f64 {
        (bytes / (1u64 << 30) as f64, "GiB")
    } else if bytes >= (1u64 << 20) as f64 {
        (bytes / (1u64 << 20) as f64, "MiB")
    } else if bytes >= 1024.0 {
        (bytes / 1024.0, "KiB")
    } else {
        (bytes, "B")
    };
    if (value - value.round()).abs() < 1e-9 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.1} {unit}")
    }
}

/// A y value with a thin space between thousands when large.
fn format_value(v: f64, step: f64) -> String {
    if step < 1.0 {
        let decimals = ((-step.log10()).ceil() as usize).min(6);
        return format!("{v:.decimals$}");
    }
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// `line` cut at spaces into lines of at most `columns` characters (a longer word stays whole);
/// continuation lines are indented by two spaces.
fn wrap(line: &str, columns: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in line.split(' ') {
        let current = lines.last_mut().expect("one line at least");
        let len = current.chars().count();
        if len > 2 && len + 1 + word.chars().count() > columns {
            lines.push(format!("  {word}"));
        } else {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
        }
    }
    lines
}

impl LinePlot {
    /// An empty plot.
    pub fn new(title: &str, x_axis: XAxis, x_label: &str, y_label: &str) -> Self {
        Self {
            title: title.to_owned(),
            subtitle: String::new(),
            x_axis,
            x_label: x_label.to_owned(),
            y_label: y_label.to_owned(),
            series: Vec::new(),
            caption: Vec::new(),
            width: 960,
            height: 540,
        }
    }

    /// Adds a named series. Points with a non-finite coordinate, or x ≤ 0 on a log axis, are
    /// left out.
    pub fn add_series(&mut self, name: &str, mut points: Vec<(f64, f64)>) {
        let log = self.x_axis == XAxis::Log2Bytes;
        points.retain(|&(x, y)| x.is_finite() && y.is_finite() && (!log || x > 0.0));
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.series.push(Series {
            name: name.to_owned(),
            points,
        });
    }

    /// Adds a caption line.
    pub fn add_caption(&mut self, line: &str) {
        self.caption.push(line.to_owned());
    }

    /// The plot as SVG text.
    pub fn to_svg(&self) -> String {
        let width = f64::from(self.width.max(300));
        let plot_height = f64::from(self.height.max(200)) - TOP - BOTTOM;
        let plot_width = width - LEFT - RIGHT;
        let points = self.series.iter().flat_map(|s| &s.points);
        let (mut x_min, mut x_max, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for &(x, y) in points {
            x_min = x_min.min(x);
            x_max = x_max.max(x);
            y_max = y_max.max(y);
        }
        if !x_min.is_finite() {
            (x_min, x_max) = if self.x_axis == XAxis::Log2Bytes {
                (512.0, 1048576.0)
            } else {
                (0.0, 1.0)
            };
        }
        let to_axis = |x: f64| match self.x_axis {
            XAxis::Log2Bytes => x.log2(),
            XAxis::Linear => x,
        };
        let (mut a_min, mut a_max) = (to_axis(x_min), to_axis(x_max));
        if self.x_axis == XAxis::Log2Bytes {
            a_min = a_min.floor();
            a_max = a_max.ceil();
        }
        if a_max <= a_min {
            a_min -= 0.5;
            a_max += 0.5;
        }
        let y_step = nice_step(if y_max > 0.0 { y_max / 6.0 } else { 1.0 / 6.0 });
        let y_top = ((y_max * 1.05) / y_step).ceil().max(1.0) * y_step;
        let px = |x: f64| LEFT + (to_axis(x) - a_min) / (a_max - a_min) * plot_width;
        let py = |y: f64| TOP + plot_height - y / y_top * plot_height;

        // Legend and caption below the axes.
        let legend_top = TOP + plot_height + BOTTOM + 6.0;
        let mut legend = String::new();
        let (mut lx, mut ly) = (LEFT, legend_top);
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let w = 40.0 + s.name.chars().count() as f64 * 7.0 + 24.0;
            if lx + w > width - RIGHT && lx > LEFT {
                lx = LEFT;
                ly += 20.0;
            }
            let _ = writeln!(
                legend,
                r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="2.5"/><circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"/><text x="{:.1}" y="{:.1}" fill="#222222">{}</text>"##,
                ly + 7.0,
                lx + 30.0,
                ly + 7.0,
                lx + 15.0,
                ly + 7.0,
                lx + 38.0,
                ly + 11.0,
                escape(&s.name)
            );
            lx += w;
        }
        let caption_top = ly + 34.0;
        // Caption lines wrap at spaces to the width (monospace: 0.6 em per character).
        let columns = ((width - 24.0) / (11.0 * 0.6)).floor().max(20.0) as usize;
        let caption: Vec<String> = self.caption.iter().flat_map(|l| wrap(l, columns)).collect();
        let height = (caption_top + caption.len() as f64 * 16.0 + 6.0).ceil();

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">"##,
            w = width
        );
        let _ = writeln!(
            svg,
            r##"<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>"##
        );
        let _ = writeln!(
            svg,
            r##"<text x="{LEFT}" y="28" font-size="17" font-weight="bold" fill="#111111">{}</text>"##,
            escape(&self.title)
        );
        if !self.subtitle.is_empty() {
            let _ = writeln!(
                svg,
                r##"<text x="{LEFT}" y="48" fill="#555555">{}</text>"##,
                escape(&self.subtitle)
            );
        }
        // Horizontal grid and y labels.
        let mut y = 0.0;
        while y <= y_top + y_step * 1e-9 {
            let yy = py(y);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{}"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#333333">{}</text>"##,
                width - RIGHT,
                if y == 0.0 { "#888888" } else { "#e3e3e3" },
                LEFT - 8.0,
                yy + 4.0,
                escape(&format_value(y, y_step))
            );
            y += y_step;
        }
        // Vertical grid and x labels.
        let mut ticks: Vec<f64> = Vec::new();
        match self.x_axis {
            XAxis::Log2Bytes => {
                let count = (a_max - a_min).round() as usize;
                let every = count.div_ceil(12).max(1);
                for k in (0..=count).step_by(every) {
                    ticks.push(2f64.powf(a_min + k as f64));
                }
            }
            XAxis::Linear => {
                let step = nice_step((a_max - a_min) / 8.0);
                let mut t = (a_min / step).ceil() * step;
                while t <= a_max + step * 1e-9 {
                    ticks.push(t);
                    t += step;
                }
            }
        }
        for &t in &ticks {
            let xx = px(t);
            let label = match self.x_axis {
                XAxis::Log2Bytes => format_bytes(t),
                XAxis::Linear => format_value(t, nice_step((a_max - a_min) / 8.0)),
            };
            let _ = writeln!(
                svg,
                r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eeeeee"/><line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#888888"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle" fill="#333333">{}</text>"##,
                TOP + plot_height,
                TOP + plot_height,
                TOP + plot_height + 5.0,
                TOP + plot_height + 19.0,
                escape(&label)
            );
        }
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="#888888"/>"##,
            TOP + plot_height
        );
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#222222">{}</text>"##,
            LEFT + plot_width / 2.0,
            TOP + plot_height + 38.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            svg,
            r##"<text x="18" y="{:.1}" text-anchor="middle" fill="#222222" transform="rotate(-90 18 {:.1})">{}</text>"##,
            TOP + plot_height / 2.0,
            TOP + plot_height / 2.0,
            escape(&self.y_label)
        );
        // The series.
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let path: Vec<String> = s
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            if path.len() > 1 {
                let _ = writeln!(
                    svg,
                    r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2.5" stroke-linejoin="round"/>"##,
                    path.join(" ")
                );
            }
            for &(x, y) in &s.points {
                let tip = match self.x_axis {
                    XAxis::Log2Bytes => format!(
                        "{}: {} → {:.1} {}",
                        s.name,
                        format_bytes(x),
                        y,
                        self.y_label
                    ),
                    XAxis::Linear => format!("{}: {x} → {y:.1} {}", s.name, self.y_label),
                };
                let _ = writeln!(
                    svg,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}" stroke="#ffffff" stroke-width="1"><title>{}</title></circle>"##,
                    px(x),
                    py(y),
                    escape(&tip)
                );
            }
        }
        if self.series.iter().all(|s| s.points.is_empty()) {
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#777777">(no data)</text>"##,
                LEFT + plot_width / 2.0,
                TOP + plot_height / 2.0
            );
        }
        svg.push_str(&legend);
        for (k, line) in caption.iter().enumerate() {
            let _ = writeln!(
                svg,
                r##"<text x="12" y="{:.1}" xml:space="preserve" font-family="Menlo, Consolas, monospace" font-size="11" fill="#555555">{}</text>"##,
                caption_top + k as f64 * 16.0,
                escape(line)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::check_well_formed;

    fn sizes() -> Vec<f64> {
        (9..=20).map(|k| f64::from(1u32 << k)).collect()
    }

    #[test]
    fn any_number_of_series_with_a_log2_axis_and_a_legend() {
        let mut plot = LinePlot::new(
            "Throughput <MB/s> & more",
            XAxis::Log2Bytes,
            "transfer size",
            "MB/s",
        );
        plot.subtitle = "median of 5".into();
        for (i, name) in ["sg", "bounce", "packet", "plx"].iter().enumerate() {
            let points = sizes()
                .iter()
                .map(|&s| (s, s.log2() * 100.0 / (i + 1) as f64))
                .collect();
            plot.add_series(name, points);
        }
        plot.add_caption("dmatx bench --sizes 512,1M");
        let svg = plot.to_svg();
        check_well_formed(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        assert!(svg.contains("Throughput &lt;MB/s&gt; &amp; more"));
        for label in [
            ">512 B<",
            ">1 KiB<",
            ">64 KiB<",
            ">1 MiB<",
            ">sg<",
            ">plx<",
            ">median of 5<",
            "dmatx bench --sizes 512,1M",
        ] {
            assert!(svg.contains(label), "no {label}");
        }
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("<circle").count(), 4 * 12 + 4);
    }

    #[test]
    fn points_sit_inside_the_axes_and_higher_values_are_higher() {
        let mut plot = LinePlot::new("t", XAxis::Log2Bytes, "x", "y");
        plot.add_series(
            "a",
            vec![(1024.0, 10.0), (512.0, 5.0), (2048.0, f64::NAN), (0.0, 1.0)],
        );
        assert_eq!(plot.series[0].points, [(512.0, 5.0), (1024.0, 10.0)]);
        let svg = plot.to_svg();
        let circles: Vec<(f64, f64)> = svg
            .lines()
            .filter(|l| l.starts_with("<circle"))
            .map(|l| {
                let attr = |name: &str| -> f64 {
                    let start = l.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                    l[start..start + l[start..].find('"').unwrap()]
                        .parse()
                        .unwrap()
                };
                (attr("cx"), attr("cy"))
            })
            .collect();
        assert_eq!(circles.len(), 2);
        assert!(circles[0].0 < circles[1].0);
        assert!(circles[0].1 > circles[1].1, "a larger y is drawn higher");
        for (x, y) in circles {
            assert!((LEFT..=f64::from(plot.width) - RIGHT).contains(&x));
            assert!((TOP..=f64::from(plot.height) - BOTTOM).contains(&y));
        }
    }

    #[test]
    fn empty_and_linear_plots_are_well_formed() {
        let plot = LinePlot::new("nothing", XAxis::Log2Bytes, "x", "y");
        let svg = plot.to_svg();
        check_well_formed(&svg).unwrap();
        assert!(svg.contains("(no data)"));
        let mut plot = LinePlot::new("lin", XAxis::Linear, "x", "y");
        plot.add_series("one point", vec![(3.0, 0.25)]);
        check_well_formed(&plot.to_svg()).unwrap();
    }

    #[test]
    fn bytes_and_values_read_well() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(4096.0), "4 KiB");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        assert_eq!(format_bytes(1048576.0), "1 MiB");
        assert_eq!(format_value(12500.0, 2500.0), "12\u{2009}500");
        assert_eq!(format_value(0.25, 0.05), "0.25");
        assert_eq!(wrap("aa bb cc dd", 5), ["aa bb", "  cc", "  dd"]);
        assert_eq!(wrap("averyverylongword x", 5), ["averyverylongword", "  x"]);
    }
}
