//! A parser for the scalar expressions found in final answers, in LaTeX or plain text:
//! `\frac{a}{b}`, `\frac12`, `\sqrt[3]{x}`, `x^{2}`, `2^10`, `3x`, `\sin^2 x`, `|x|`, `n!`,
//! `\binom{n}{k}`, `\log_2 8`, `1.5e3`, `\pi`, `e`, `i`, `\infty`.
//!
//! `^` is always a power, implicit multiplication binds like `*`, and a digit run after `^`
//! is the whole exponent (`2^10` is 1024: that is what the writer of a plain-text answer means).
//! Depth and length are bounded, so a hostile input is rejected, not stack-overflowed.

use super::number::Rational;

/// Deepest nesting of brackets and operators the parser follows before it gives up.
const MAX_DEPTH: usize = 48;
/// Longest expression (in characters) the parser accepts.
pub const MAX_EXPR_CHARS: usize = 600;

/// A parsed scalar expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A number literal; `decimal` is set when it was written with a decimal point or exponent,
    /// i.e. it may be a rounded value.
    Num {
        value: NumValue,
        decimal: bool,
        /// Digits after the decimal point as written.
        places: u32,
    },
    /// A variable (`x`, `x_1`, `\theta`).
    Var(String),
    /// pi.
    Pi,
    /// Euler's number.
    E,
    /// The imaginary unit.
    I,
    /// Positive infinity.
    Infinity,
    /// `-a`.
    Neg(Box<Expr>),
    /// `a + b`.
    Add(Box<Expr>, Box<Expr>),
    /// `a - b`.
    Sub(Box<Expr>, Box<Expr>),
    /// `a * b`.
    Mul(Box<Expr>, Box<Expr>),
    /// `a / b`.
    Div(Box<Expr>, Box<Expr>),
    /// `a ^ b`.
    Pow(Box<Expr>, Box<Expr>),
    /// The real `n`-th root (`\sqrt[n]{a}`; `n = 2` for `\sqrt`).
    Root(u32, Box<Expr>),
    /// `n!`.
    Factorial(Box<Expr>),
    /// `|a|`.
    Abs(Box<Expr>),
    /// `\binom{n}{k}`.
    Binom(Box<Expr>, Box<Expr>),
    /// `\log_b a` (natural log when `b` is `None`... see [`Func::Log`]).
    LogBase(Box<Expr>, Box<Expr>),
    /// A named function of one argument.
    Call(Func, Box<Expr>),
}

/// The value of a number literal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NumValue {
    /// Fits an exact rational.
    Exact(Rational),
    /// Too many digits for an exact rational.
    Approx(f64),
}

/// Functions of one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Sin,
    Cos,
    Tan,
    Sec,
    Csc,
    Cot,
    Arcsin,
    Arccos,
    Arctan,
    Sinh,
    Cosh,
    Tanh,
    /// `\operatorname{csch}`, `\operatorname{sech}`, `\coth`: reciprocal hyperbolic functions.
    Csch,
    Sech,
    Coth,
    /// Inverses of the reciprocal trigonometric functions.
    Arccsc,
    Arcsec,
    Arccot,
    /// Absolute value written as a function, `abs(x)`.
    Abs,
    /// Base-10 logarithm written `lg`.
    Lg,
    /// `floor(x)`, `ceiling(x)`.
    Floor,
    Ceil,
    /// `factorial(n)`, the function form of `n!`.
    Factorial,
    /// Natural logarithm (`\ln`).
    Ln,
    /// `\log` without a base: taken as natural log; both sides of a comparison read it alike.
    Log,
    Exp,
}

/// Words (with or without a backslash) that name functions or constants.
const WORDS: &[(&str, Tok)] = &[
    ("arccsc", Tok::Func(Func::Arccsc)),
    ("arcsec", Tok::Func(Func::Arcsec)),
    ("arccot", Tok::Func(Func::Arccot)),
    ("cosech", Tok::Func(Func::Csch)),
    ("cosec", Tok::Func(Func::Csc)),
    ("csch", Tok::Func(Func::Csch)),
    ("sech", Tok::Func(Func::Sech)),
    ("coth", Tok::Func(Func::Coth)),
    ("arcsin", Tok::Func(Func::Arcsin)),
    ("arccos", Tok::Func(Func::Arccos)),
    ("arctan", Tok::Func(Func::Arctan)),
    ("infinity", Tok::Infinity),
    ("sinh", Tok::Func(Func::Sinh)),
    ("cosh", Tok::Func(Func::Cosh)),
    ("tanh", Tok::Func(Func::Tanh)),
    ("sqrt", Tok::Sqrt),
    ("sin", Tok::Func(Func::Sin)),
    ("cos", Tok::Func(Func::Cos)),
    ("tan", Tok::Func(Func::Tan)),
    ("sec", Tok::Func(Func::Sec)),
    ("csc", Tok::Func(Func::Csc)),
    ("cot", Tok::Func(Func::Cot)),
    ("exp", Tok::Func(Func::Exp)),
    ("log", Tok::Func(Func::Log)),
    ("inf", Tok::Infinity),
    ("ln", Tok::Func(Func::Ln)),
    ("pi", Tok::Pi),
];

/// Plain-text names that only count as functions when called: `abs(x)`, `lg(x)`, `asin(x)`;
/// otherwise the letters are a product of variables.
const CALLED: [(&str, Func); 12] = [
    ("factorial(", Func::Factorial),
    ("abs(", Func::Abs),
    ("lg(", Func::Lg),
    ("asin(", Func::Arcsin),
    ("acos(", Func::Arccos),
    ("atan(", Func::Arctan),
    ("acsc(", Func::Arccsc),
    ("asec(", Func::Arcsec),
    ("acot(", Func::Arccot),
    ("floor(", Func::Floor),
    ("ceiling(", Func::Ceil),
    ("ceil(", Func::Ceil),
];

/// Whether `s` contains a plain word (three or more letters that are not function names, like
/// "Monday" or "yes"): such answers are text, not products of single-letter variables.
pub fn is_wordy(s: &str) -> bool {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut unknown_run = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            // A command name is never a word of the answer.
            i += 1;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            unknown_run = 0;
            continue;
        }
        if !c.is_ascii_alphabetic() {
            unknown_run = 0;
            i += 1;
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 12)].iter().collect();
        let called = CALLED.iter().map(|(w, _)| *w).find(|w| rest.starts_with(w));
        if let Some(w) = WORDS
            .iter()
            .map(|(w, _)| *w)
            .find(|w| rest.starts_with(w))
            .or(called)
        {
            i += w.len();
            unknown_run = 0;
        } else {
            unknown_run += 1;
            if unknown_run >= 3 {
                return true;
            }
            i += 1;
        }
    }
    false
}

/// The longest known command that `name` starts with, when the rest is at most three letters
/// (variables written against the command without a space): `cdotb` is `\cdot b`.
fn glued_command(name: &str) -> Option<(&'static str, Tok)> {
    const OPERATORS: [(&str, Tok); 4] = [
        ("cdot", Tok::Star),
        ("times", Tok::Star),
        ("ast", Tok::Star),
        ("div", Tok::Slash),
    ];
    OPERATORS
        .iter()
        .cloned()
        .chain(WORDS.iter().cloned())
        .filter(|(w, _)| name.starts_with(w) && name.len() - w.len() <= 3)
        .max_by_key(|(w, _)| w.len())
}

/// LaTeX commands that stand for a variable.
const GREEK: &[&str] = &[
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Xi",
    "Sigma",
    "Phi",
    "Psi",
    "Omega",
];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num {
        value: NumValue,
        decimal: bool,
        places: u32,
    },
    Var(String),
    Pi,
    Infinity,
    Func(Func),
    Sqrt,
    Frac,
    Binom,
    Plus,
    Minus,
    Star,
    Slash,
    Caret,
    Bang,
    Underscore,
    Bar,
    Open(char),
    Close(char),
}

/// Why an expression could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub &'static str);

type PResult<T> = Result<T, ParseError>;

fn lex(s: &str) -> PResult<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '0'..='9' | '.' => {
                let (tok, next) = lex_number(&chars, i)?;
                out.push(tok);
                i = next;
            }
            '+' => {
                out.push(Tok::Plus);
                i += 1;
            }
            '-' => {
                out.push(Tok::Minus);
                i += 1;
            }
            '*' => {
                // `**` is a plain-text power.
                if chars.get(i + 1) == Some(&'*') {
                    out.push(Tok::Caret);
                    i += 2;
                } else {
                    out.push(Tok::Star);
                    i += 1;
                }
            }
            '/' => {
                out.push(Tok::Slash);
                i += 1;
            }
            '^' => {
                out.push(Tok::Caret);
                i += 1;
            }
            '!' => {
                out.push(Tok::Bang);
                i += 1;
            }
            '_' => {
                out.push(Tok::Underscore);
                i += 1;
            }
            '|' => {
                out.push(Tok::Bar);
                i += 1;
            }
            '(' | '[' | '{' => {
                out.push(Tok::Open(c));
                i += 1;
            }
            ')' | ']' | '}' => {
                out.push(Tok::Close(c));
                i += 1;
            }
            '\\' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && chars[j].is_ascii_alphabetic() {
                    j += 1;
                }
                if j == start {
                    // `\{`, `\|`, `\,` and friends.
                    match chars.get(start) {
                        Some('|') => out.push(Tok::Bar),
                        Some(',') | Some(';') | Some('!') | Some(' ') | Some(':') => {}
                        _ => return Err(ParseError("unsupported escape")),
                    }
                    i = start + 1;
                    continue;
                }
                let name: String = chars[start..j].iter().collect();
                i = j;
                match name.as_str() {
                    "frac" | "dfrac" | "tfrac" | "cfrac" => out.push(Tok::Frac),
                    "binom" | "dbinom" | "tbinom" => out.push(Tok::Binom),
                    "cdot" | "times" | "ast" => out.push(Tok::Star),
                    "div" => out.push(Tok::Slash),
                    "infty" => out.push(Tok::Infinity),
                    "left" | "right" | "big" | "Big" | "bigl" | "bigr" | "Bigl" | "Bigr"
                    | "quad" | "qquad" | "displaystyle" => {}
                    "lvert" | "rvert" | "vert" => out.push(Tok::Bar),
                    "operatorname" | "mathrm" | "space" => {}
                    "abs" => out.push(Tok::Func(Func::Abs)),
                    other => {
                        if let Some((_, t)) = WORDS.iter().find(|(w, _)| *w == other) {
                            out.push(t.clone());
                        } else if GREEK.contains(&other) {
                            out.push(Tok::Var(format!("\\{other}")));
                        } else if let Some((cmd, tok)) = glued_command(other) {
                            // `\cdotb`, `\sinx`: a command run together with the letters after it.
                            out.push(tok);
                            out.extend(other[cmd.len()..].chars().map(|c| Tok::Var(c.to_string())));
                        } else {
                            return Err(ParseError("unknown command"));
                        }
                    }
                }
            }
            c if c.is_ascii_alphabetic() => {
                let rest: String = chars[i..chars.len().min(i + 12)].iter().collect();
                if let Some((w, f)) = CALLED.iter().find(|(w, _)| rest.starts_with(w)) {
                    out.push(Tok::Func(*f));
                    i += w.len() - 1;
                } else if let Some((w, t)) = WORDS.iter().find(|(w, _)| rest.starts_with(w)) {
                    out.push(t.clone());
                    i += w.len();
                } else {
                    out.push(Tok::Var(c.to_string()));
                    i += 1;
                }
            }
            _ => return Err(ParseError("unexpected character")),
        }
    }
    Ok(out)
}

/// Lexes `123`, `1.5`, `.5`, `1.5e-3` starting at `i`.
fn lex_number(chars: &[char], mut i: usize) -> PResult<(Tok, usize)> {
    let start = i;
    while i < chars.len() && chars[i].is_ascii_digit() {
        i += 1;
    }
    let int_part: String = chars[start..i].iter().collect();
    let mut frac_part = String::new();
    let mut decimal = false;
    if i < chars.len() && chars[i] == '.' {
        let fs = i + 1;
        let mut j = fs;
        while j < chars.len() && chars[j].is_ascii_digit() {
            j += 1;
        }
        if j > fs || !int_part.is_empty() {
            decimal = true;
            frac_part = chars[fs..j].iter().collect();
            i = j;
        }
    }
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(ParseError("lone decimal point"));
    }
    // Scientific notation: `e` or `E` followed by an optionally signed digit run.
    let mut exp10: i32 = 0;
    if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
        let mut j = i + 1;
        let neg = matches!(chars.get(j), Some('-'));
        if matches!(chars.get(j), Some('-') | Some('+')) {
            j += 1;
        }
        let ds = j;
        while j < chars.len() && chars[j].is_ascii_digit() {
            j += 1;
        }
        if j > ds && j - ds <= 4 {
            let e: i32 = chars[ds..j]
                .iter()
                .collect::<String>()
                .parse()
                .map_err(|_| ParseError("bad exponent"))?;
            exp10 = if neg { -e } else { e };
            decimal = true;
            i = j;
        }
    }
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let scale = exp10 - frac_part.len() as i32;
    let value = exact_decimal(digits, scale)
        .map(NumValue::Exact)
        .unwrap_or_else(|| {
            let text = format!(
                "{}.{}e{}",
                if int_part.is_empty() { "0" } else { &int_part },
                if frac_part.is_empty() {
                    "0"
                } else {
                    &frac_part
                },
                exp10
            );
            NumValue::Approx(text.parse().unwrap_or(f64::NAN))
        });
    let places = if exp10 == 0 {
        frac_part.len() as u32
    } else {
        0
    };
    Ok((
        Tok::Num {
            value,
            decimal,
            places,
        },
        i,
    ))
}

/// `digits * 10^scale` as an exact rational, if it fits.
fn exact_decimal(digits: &str, scale: i32) -> Option<Rational> {
    if digits.len() > 36 || scale.abs() > 36 {
        return None;
    }
    let mantissa: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let m = Rational::integer(mantissa);
    let p = Rational::integer(10).powi(scale.abs() as i128)?;
    if scale >= 0 {
        m.checked_mul(p)
    } else {
        m.checked_div(p)
    }
}

/// Parses a scalar expression.
pub fn parse_expr(s: &str) -> PResult<Expr> {
    if s.chars().count() > MAX_EXPR_CHARS {
        return Err(ParseError("expression too long"));
    }
    let toks = lex(s)?;
    if toks.is_empty() {
        return Err(ParseError("empty expression"));
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        bars: 0,
    };
    let e = p.expr()?;
    if p.pos != p.toks.len() {
        return Err(ParseError("trailing tokens"));
    }
    Ok(e)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
    /// Absolute values open at this point: a `|` after an operand opens a new one (a product,
    /// `a|x|`) only when none is open, and otherwise closes the innermost.
    bars: usize,
}

fn bx(e: Expr) -> Box<Expr> {
    Box::new(e)
}

fn closing(open: char) -> char {
    match open {
        '(' => ')',
        '[' => ']',
        _ => '}',
    }
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn enter(&mut self) -> PResult<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ParseError("nesting too deep"));
        }
        Ok(())
    }

    fn expr(&mut self) -> PResult<Expr> {
        self.enter()?;
        let mut lhs = self.term()?;
        loop {
            match self.peek() {
                Some(Tok::Plus) => {
                    self.pos += 1;
                    lhs = Expr::Add(bx(lhs), bx(self.term()?));
                }
                Some(Tok::Minus) => {
                    self.pos += 1;
                    lhs = Expr::Sub(bx(lhs), bx(self.term()?));
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(lhs)
    }

    /// Products and quotients, explicit or implicit (`2x`, `3\sqrt{2}`, `(a)(b)`).
    fn term(&mut self) -> PResult<Expr> {
        self.enter()?;
        let mut lhs = self.unary()?;
        loop {
            match self.peek() {
                Some(Tok::Star) => {
                    self.pos += 1;
                    lhs = Expr::Mul(bx(lhs), bx(self.unary()?));
                }
                Some(Tok::Slash) => {
                    self.pos += 1;
                    lhs = Expr::Div(bx(lhs), bx(self.unary()?));
                }
                Some(t) if starts_operand(t) || (*t == Tok::Bar && self.bars == 0) => {
                    lhs = Expr::Mul(bx(lhs), bx(self.power()?));
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn unary(&mut self) -> PResult<Expr> {
        self.enter()?;
        let e = match self.peek() {
            Some(Tok::Minus) => {
                self.pos += 1;
                Expr::Neg(bx(self.unary()?))
            }
            Some(Tok::Plus) => {
                self.pos += 1;
                self.unary()?
            }
            _ => self.power()?,
        };
        self.depth -= 1;
        Ok(e)
    }

    fn power(&mut self) -> PResult<Expr> {
        self.enter()?;
        let base = self.postfix()?;
        let e = if self.peek() == Some(&Tok::Caret) {
            self.pos += 1;
            let exp = self.exponent()?;
            Expr::Pow(bx(base), bx(exp))
        } else {
            base
        };
        self.depth -= 1;
        Ok(e)
    }

    /// The exponent after `^`: a group, or a signed atom with its own powers (right assoc.).
    fn exponent(&mut self) -> PResult<Expr> {
        match self.peek() {
            Some(Tok::Minus) => {
                self.pos += 1;
                Ok(Expr::Neg(bx(self.exponent()?)))
            }
            Some(Tok::Plus) => {
                self.pos += 1;
                self.exponent()
            }
            _ => self.power(),
        }
    }

    fn postfix(&mut self) -> PResult<Expr> {
        let mut e = self.primary()?;
        while self.peek() == Some(&Tok::Bang) {
            self.pos += 1;
            e = Expr::Factorial(bx(e));
        }
        Ok(e)
    }

    /// A braced group `{...}` or a single token, as LaTeX reads command arguments
    /// (`\frac12`, `\sqrt3`).
    fn argument(&mut self) -> PResult<Expr> {
        self.enter()?;
        let e = match self.next() {
            Some(Tok::Open('{')) => {
                let e = self.expr()?;
                self.expect_close('}')?;
                e
            }
            Some(Tok::Num {
                value: NumValue::Exact(r),
                decimal: false,
                ..
            }) if r.is_integer() && r.numer() >= 10 => {
                // `\frac12` is 1/2: a multi-digit run as a bare argument gives one digit.
                self.pos -= 1;
                self.split_leading_digit(r)?
            }
            Some(_) => {
                self.pos -= 1;
                self.primary()?
            }
            None => return Err(ParseError("missing argument")),
        };
        self.depth -= 1;
        Ok(e)
    }

    /// Splits the integer token at `pos` into its first digit (returned) and the rest (kept).
    fn split_leading_digit(&mut self, r: Rational) -> PResult<Expr> {
        let s = r.numer().to_string();
        let (first, rest) = s.split_at(1);
        let rest_val = rest.parse::<i128>().map_err(|_| ParseError("bad digits"))?;
        self.toks[self.pos] = Tok::Num {
            value: NumValue::Exact(Rational::integer(rest_val)),
            decimal: false,
            places: 0,
        };
        let first_val = first
            .parse::<i128>()
            .map_err(|_| ParseError("bad digits"))?;
        Ok(Expr::Num {
            value: NumValue::Exact(Rational::integer(first_val)),
            decimal: false,
            places: 0,
        })
    }

    fn expect_close(&mut self, c: char) -> PResult<()> {
        match self.next() {
            Some(Tok::Close(x)) if x == c => Ok(()),
            _ => Err(ParseError("unbalanced brackets")),
        }
    }

    fn primary(&mut self) -> PResult<Expr> {
        self.enter()?;
        let tok = self.next().ok_or(ParseError("unexpected end"))?;
        let e = match tok {
            Tok::Num {
                value,
                decimal,
                places,
            } => Expr::Num {
                value,
                decimal,
                places,
            },
            Tok::Var(name) => {
                let mut name = name;
                if self.peek() == Some(&Tok::Underscore) {
                    self.pos += 1;
                    name.push('_');
                    name.push_str(&self.subscript_text()?);
                }
                match name.as_str() {
                    "e" => Expr::E,
                    "i" => Expr::I,
                    _ => Expr::Var(name),
                }
            }
            Tok::Pi => Expr::Pi,
            Tok::Infinity => Expr::Infinity,
            Tok::Open(c) => {
                let e = self.expr()?;
                self.expect_close(closing(c))?;
                e
            }
            Tok::Bar => {
                self.bars += 1;
                let e = self.expr()?;
                self.bars -= 1;
                if self.next() != Some(Tok::Bar) {
                    return Err(ParseError("unclosed absolute value"));
                }
                Expr::Abs(bx(e))
            }
            Tok::Frac => {
                let n = self.argument()?;
                let d = self.argument()?;
                Expr::Div(bx(n), bx(d))
            }
            Tok::Binom => {
                let n = self.argument()?;
                let k = self.argument()?;
                Expr::Binom(bx(n), bx(k))
            }
            Tok::Sqrt => {
                let mut degree = 2u32;
                if self.peek() == Some(&Tok::Open('[')) {
                    self.pos += 1;
                    degree = match self.next() {
                        Some(Tok::Num {
                            value: NumValue::Exact(r),
                            decimal: false,
                            ..
                        }) if r.is_integer() && (1..=64).contains(&r.numer()) => r.numer() as u32,
                        _ => return Err(ParseError("unsupported root degree")),
                    };
                    self.expect_close(']')?;
                }
                Expr::Root(degree, bx(self.argument()?))
            }
            Tok::Func(f) => self.function(f)?,
            _ => return Err(ParseError("unexpected token")),
        };
        self.depth -= 1;
        Ok(e)
    }

    /// `\sin^2 x`, `\sin(x)`, `\log_2 8`, `\ln x`.
    fn function(&mut self, f: Func) -> PResult<Expr> {
        let mut base = None;
        let mut power = None;
        for _ in 0..2 {
            match self.peek() {
                Some(Tok::Underscore) if f == Func::Log && base.is_none() => {
                    self.pos += 1;
                    base = Some(self.argument()?);
                }
                Some(Tok::Caret) if power.is_none() => {
                    self.pos += 1;
                    power = Some(self.exponent()?);
                }
                _ => {}
            }
        }
        // The argument: a bracketed group, or an implicit product like `2x` in `\sin 2x`.
        let arg = match self.peek() {
            Some(Tok::Open(_)) => self.primary()?,
            _ => {
                let mut a = self.power()?;
                while let Some(t) = self.peek() {
                    if !starts_operand(t) || matches!(t, Tok::Func(_)) {
                        break;
                    }
                    a = Expr::Mul(bx(a), bx(self.power()?));
                }
                a
            }
        };
        // `\sin^{-1} x` is the inverse function, not a reciprocal.
        let inverse = match (f, &power) {
            (Func::Sin, Some(p)) if is_minus_one(p) => Some(Func::Arcsin),
            (Func::Cos, Some(p)) if is_minus_one(p) => Some(Func::Arccos),
            (Func::Tan, Some(p)) if is_minus_one(p) => Some(Func::Arctan),
            _ => None,
        };
        if let Some(inv) = inverse {
            return Ok(Expr::Call(inv, bx(arg)));
        }
        let applied = match base {
            Some(b) => Expr::LogBase(bx(b), bx(arg)),
            None => Expr::Call(f, bx(arg)),
        };
        Ok(match power {
            Some(p) => Expr::Pow(bx(applied), bx(p)),
            None => applied,
        })
    }

    /// The text of a subscript (`x_1`, `a_{n+1}`) used as part of a variable name.
    fn subscript_text(&mut self) -> PResult<String> {
        match self.next() {
            Some(Tok::Open('{')) => {
                let mut depth = 1;
                let mut text = String::new();
                while depth > 0 {
                    let t = self.next().ok_or(ParseError("unclosed subscript"))?;
                    match &t {
                        Tok::Open('{') => depth += 1,
                        Tok::Close('}') => depth -= 1,
                        _ => {}
                    }
                    if depth > 0 {
                        text.push_str(&format!("{t:?}"));
                    }
                }
                Ok(text)
            }
            Some(t @ (Tok::Num { .. } | Tok::Var(_))) => Ok(format!("{t:?}")),
            _ => Err(ParseError("bad subscript")),
        }
    }
}

fn is_minus_one(e: &Expr) -> bool {
    matches!(e, Expr::Neg(inner) if matches!(**inner, Expr::Num { value: NumValue::Exact(r), .. } if r == Rational::integer(1)))
}

/// Tokens that can begin an implicitly multiplied factor.
fn starts_operand(t: &Tok) -> bool {
    matches!(
        t,
        Tok::Num { .. }
            | Tok::Var(_)
            | Tok::Pi
            | Tok::Infinity
            | Tok::Func(_)
            | Tok::Sqrt
            | Tok::Frac
            | Tok::Binom
            | Tok::Open(_)
    )
}

impl Expr {
    /// Whether a number literal written with a decimal point appears anywhere (the value may
    /// then be rounded, so numeric tolerance applies).
    pub fn has_decimal(&self) -> bool {
        let mut found = false;
        self.visit(&mut |e| {
            if let Expr::Num { decimal: true, .. } = e {
                found = true;
            }
        });
        found
    }

    /// Digits after the decimal point when the whole expression is one decimal literal
    /// (possibly negated), e.g. 4 for `0.0833`.
    pub fn decimal_places(&self) -> Option<u32> {
        match self {
            Expr::Num {
                decimal: true,
                places,
                ..
            } => Some(*places),
            Expr::Neg(inner) => inner.decimal_places(),
            _ => None,
        }
    }

    /// Names of the variables, sorted and deduplicated.
    pub fn variables(&self) -> Vec<String> {
        let mut vars = Vec::new();
        self.visit(&mut |e| {
            if let Expr::Var(v) = e {
                vars.push(v.clone());
            }
        });
        vars.sort();
        vars.dedup();
        vars
    }

    /// Variables the expression divides by (in a denominator or under a negative power).
    pub fn divisor_variables(&self) -> Vec<String> {
        let mut vars = Vec::new();
        self.visit(&mut |e| match e {
            Expr::Div(_, b) => vars.extend(b.variables()),
            Expr::Pow(a, b) if matches!(**b, Expr::Neg(_)) => vars.extend(a.variables()),
            _ => {}
        });
        vars.sort();
        vars.dedup();
        vars
    }

    /// The expression with each variable of `point` replaced by its exact value.
    pub fn substitute(&self, point: &[(String, Rational)]) -> Expr {
        let sub = |e: &Expr| Box::new(e.substitute(point));
        match self {
            Expr::Var(v) => match point.iter().find(|(name, _)| name == v) {
                Some((_, r)) => Expr::Num {
                    value: NumValue::Exact(*r),
                    decimal: false,
                    places: 0,
                },
                None => self.clone(),
            },
            Expr::Neg(a) => Expr::Neg(sub(a)),
            Expr::Root(n, a) => Expr::Root(*n, sub(a)),
            Expr::Factorial(a) => Expr::Factorial(sub(a)),
            Expr::Abs(a) => Expr::Abs(sub(a)),
            Expr::Call(f, a) => Expr::Call(*f, sub(a)),
            Expr::Add(a, b) => Expr::Add(sub(a), sub(b)),
            Expr::Sub(a, b) => Expr::Sub(sub(a), sub(b)),
            Expr::Mul(a, b) => Expr::Mul(sub(a), sub(b)),
            Expr::Div(a, b) => Expr::Div(sub(a), sub(b)),
            Expr::Pow(a, b) => Expr::Pow(sub(a), sub(b)),
            Expr::Binom(a, b) => Expr::Binom(sub(a), sub(b)),
            Expr::LogBase(a, b) => Expr::LogBase(sub(a), sub(b)),
            Expr::Num { .. } | Expr::Pi | Expr::E | Expr::I | Expr::Infinity => self.clone(),
        }
    }

    /// Whether the imaginary unit appears anywhere.
    pub fn has_imaginary(&self) -> bool {
        let mut found = false;
        self.visit(&mut |e| found |= *e == Expr::I);
        found
    }

    /// Whether the expression is one variable, e.g. the `x` of `x = 5`.
    pub fn is_variable(&self) -> bool {
        matches!(self, Expr::Var(_))
    }

    fn visit(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Neg(a)
            | Expr::Root(_, a)
            | Expr::Factorial(a)
            | Expr::Abs(a)
            | Expr::Call(_, a) => a.visit(f),
            Expr::Add(a, b)
            | Expr::Sub(a, b)
            | Expr::Mul(a, b)
            | Expr::Div(a, b)
            | Expr::Pow(a, b)
            | Expr::Binom(a, b)
            | Expr::LogBase(a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Expr::Num { .. } | Expr::Var(_) | Expr::Pi | Expr::E | Expr::I | Expr::Infinity => {}
        }
    }
}
