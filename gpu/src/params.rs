//! Typed kernel parameters. Every kernel takes one `#[repr(C)]` struct by value; the struct is
//! declared once, in Rust, with `kernel_params!`, and its C twin in `gpu/kernels/<op>.cuh` is
//! generated from that declaration ([`cuh`]; a test keeps the committed file equal to it).
//! A kernel therefore reads exactly the fields the launcher writes, in the same order and with
//! the same types; at load the device (`cuda::Dev::open`) also checks, through the driver, that
//! each kernel takes one parameter of the struct's size, and names the kernel when it does not.

use std::marker::PhantomData;

/// A C type a parameter field can have, and how the kernel unpacks it.
pub trait CType {
    /// The C spelling of the type.
    fn c_name() -> String;
    /// The kernel-side arguments this field expands to (`expr` is the field's C expression).
    fn c_args(expr: &str) -> String {
        expr.to_string()
    }
}

macro_rules! scalar_ctype {
    ($($t:ty => $c:literal),*) => {$(
        impl CType for $t {
            fn c_name() -> String {
                $c.to_string()
            }
        }
    )*};
}
scalar_ctype!(f32 => "float", f64 => "double", i8 => "signed char", i32 => "int", i64 => "long",
    u8 => "unsigned char", u16 => "u16", u32 => "unsigned int", u64 => "u64");

/// A device pointer to `T` the kernel only reads (`const T*`); 0 is null.
#[repr(transparent)]
pub struct Ptr<T>(pub u64, PhantomData<T>);

/// A device pointer to `T` the kernel writes (`T*`); 0 is null.
#[repr(transparent)]
pub struct PtrMut<T>(pub u64, PhantomData<T>);

macro_rules! ptr_impls {
    ($p:ident, $konst:literal) => {
        impl<T> $p<T> {
            pub const NULL: $p<T> = $p(0, PhantomData);

            pub const fn new(addr: u64) -> $p<T> {
                $p(addr, PhantomData)
            }

            /// `addr` when `Some`, else null.
            pub fn or_null(addr: Option<u64>) -> $p<T> {
                $p(addr.unwrap_or(0), PhantomData)
            }
        }
        impl<T> Clone for $p<T> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T> Copy for $p<T> {}
        impl<T> std::fmt::Debug for $p<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
        impl<T: CType> CType for $p<T> {
            fn c_name() -> String {
                format!("{}{}*", $konst, T::c_name())
            }
        }
    };
}
ptr_impls!(Ptr, "const ");
ptr_impls!(PtrMut, "");

/// A kernel's parameter struct.
pub trait KernelParams: Copy {
    /// The kernels that take this struct (several builds of one kernel share it).
    const KERNELS: &'static [&'static str];
    /// The C declaration of the struct (and the `<NAME>_ARGS(p)` macro that unpacks it).
    fn c_struct() -> String;
}

/// What the loader checks of one kernel.
#[derive(Clone, Copy, Debug)]
pub struct KernelInfo {
    pub name: &'static str,
    /// `size_of` the parameter struct.
    pub params_bytes: usize,
    pub c_struct: fn() -> String,
}

/// Declares a kernel parameter struct: `Name => ["kernel_a", ...] { field: Type, ... }`.
/// Fields are in the order the kernel's body takes them.
macro_rules! kernel_params {
    ($(#[$m:meta])* $name:ident => [$($kernel:literal),*] {
        $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)?
    }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct $name {
            $($(#[$fm])* pub $f: $t),*
        }

        impl $crate::params::KernelParams for $name {
            const KERNELS: &'static [&'static str] = &[$($kernel),*];

            fn c_struct() -> String {
                use $crate::params::CType;
                let mut s = String::from("typedef struct {\n");
                $(s += &format!("    {} {};\n", <$t>::c_name(), stringify!($f));)*
                s += &format!("}} {};\n", stringify!($name));
                let args: Vec<String> =
                    vec![$(<$t>::c_args(&format!("(p).{}", stringify!($f)))),*];
                s += &format!(
                    "#define {}_ARGS(p) {}\n",
                    $crate::params::macro_name(stringify!($name)),
                    args.join(", ")
                );
                s
            }
        }

        impl $crate::params::CType for $name {
            fn c_name() -> String {
                stringify!($name).to_string()
            }

            fn c_args(expr: &str) -> String {
                format!(
                    "{}_ARGS({expr})",
                    $crate::params::macro_name(stringify!($name))
                )
            }
        }
    };
}
pub(crate) use kernel_params;

/// `Conv1dFwdF32` → `CONV1D_FWD_F32`.
pub fn macro_name(rust_name: &str) -> String {
    let mut out = String::new();
    let mut prev_lower = false;
    for ch in rust_name.chars() {
        if ch.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = ch.is_ascii_lowercase() || ch.is_ascii_digit();
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// The loader's record of `P`'s kernels.
pub fn info<P: KernelParams>() -> impl Iterator<Item = KernelInfo> {
    P::KERNELS.iter().map(|&name| KernelInfo {
        name,
        params_bytes: std::mem::size_of::<P>(),
        c_struct: P::c_struct,
    })
}

/// The text of `gpu/kernels/<op>.cuh` for the parameter structs `structs` (in order).
pub fn cuh(op: &str, structs: &[fn() -> String]) -> String {
    let mut s = format!(
        "// Parameter structs of the {op} kernels, one per kernel, passed by value.\n\
         // GENERATED from gpu/src/ops/{op}.rs (kernel_params!): do not edit; after changing a\n\
         // struct there, run `VET_WRITE_CUH=1 cargo test -p gpu --lib cuh` to rewrite this file.\n"
    );
    for c in structs {
        s.push('\n');
        s += &c();
    }
    s
}
