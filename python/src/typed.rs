//! Bytes from numpy seen as slices of an element type: `typed` and `with_typed_mut`
//! (through an aligned copy when the array's bytes are not aligned for it), and
//! `by_width!`, which picks the unsigned integer of an element's width for steps that
//! only move bits (dispatch, combine, materialize).

pub(crate) use phalanx::by_width;

pub(crate) use phalanx::dtype::typed;

/// [`phalanx::dtype::with_typed_mut`] with the collectives' error.
pub(crate) fn with_typed_mut<T: bytemuck::Pod>(
    bytes: &mut [u8],
    f: impl FnOnce(&mut [T]) -> phalanx::Result<()>,
) -> phalanx::Result<()> {
    phalanx::dtype::with_typed_mut(bytes, f)
}
