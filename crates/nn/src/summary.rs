//! The model table, drawn like Keras 3's `model.summary()`.

use crate::model::LayerInfo;

const W: [usize; 3] = [33, 24, 15];

fn line(l: char, m: char, r: char, fill: char) -> String {
    let seg = |w: usize| fill.to_string().repeat(w);
    format!("{l}{}{m}{}{m}{}{r}\n", seg(W[0]), seg(W[1]), seg(W[2]))
}

fn row(edge: char, a: &str, b: &str, c: &str) -> String {
    format!("{edge} {a:<w0$} {edge} {b:<w1$} {edge} {c:>w2$} {edge}\n", w0 = W[0] - 2, w1 = W[1] - 2, w2 = W[2] - 2)
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes of float32 parameters, in Keras's units (B, KB, MB with 1024 steps).
fn size(params: usize) -> String {
    let bytes = params as f64 * 4.0;
    match bytes {
        b if b < 1024.0 => format!("{b:.2} B"),
        b if b < 1024.0 * 1024.0 => format!("{:.2} KB", b / 1024.0),
        b => format!("{:.2} MB", b / (1024.0 * 1024.0)),
    }
}

pub fn render(layers: &[LayerInfo], total: usize) -> String {
    let mut s = String::from("Model: \"sequential\"\n");
    s += &line('┏', '┳', '┓', '━');
    s += &row('┃', "Layer (type)", "Output Shape", "Param #");
    s += &line('┡', '╇', '┩', '━');
    for (i, l) in layers.iter().enumerate() {
        let dims: Vec<String> = l.output_shape.iter().map(|d| d.to_string()).collect();
        let shape = format!("(None, {})", dims.join(", "));
        s += &row('│', &format!("{} ({})", l.name, l.class_name), &shape, &thousands(l.params));
        if i + 1 < layers.len() {
            s += &line('├', '┼', '┤', '─');
        }
    }
    s += &line('└', '┴', '┘', '─');
    s += &format!(" Total params: {} ({})\n", thousands(total), size(total));
    s += &format!(" Trainable params: {} ({})\n", thousands(total), size(total));
    s += &format!(" Non-trainable params: 0 ({})\n", size(0));
    s
}
