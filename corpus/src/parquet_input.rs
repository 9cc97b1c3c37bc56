//! Parquet inputs of `corpus prepare` (how Hugging Face datasets such as FineWeb publish their
//! text): one document per row, its text the string column `text_field`. Only that column is
//! decoded (a projection); rows are read in file order, row group after row group. A null in
//! the column is an empty document (skipped and counted, as an empty line of JSONL); a missing
//! column, or one that does not hold strings, is an error naming the file and its columns.
//! Snappy and zstd compression (and uncompressed pages) are read; other codecs are refused by
//! the decoder with its own message. A local file is read in place (pages as the rows need
//! them); an object-store input by ranged GETs of the footer and the column's chunks
//! (`parquet_object.rs`).

use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use parquet::basic::Repetition;
use parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use crate::error::CorpusError;

/// A row group about to be decoded: `index` of `of`, and where its chunk of the decoded column
/// lies in the file (`start`, `len` bytes; the dictionary page included).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowGroupAt {
    pub index: usize,
    pub of: usize,
    pub start: u64,
    pub len: u64,
}

/// Calls `document` with each row's text (None for a null), in order, until it returns false.
/// `row_group` is told of each row group before it is decoded: which one of how many, and the
/// byte range of the column's chunk in it (an object-store reader fetches it in one GET;
/// progress counts the groups).
pub(crate) fn for_each_text<R: ChunkReader + 'static>(
    file: R,
    shown: &str,
    field: &str,
    row_group: &dyn Fn(RowGroupAt) -> Result<(), String>,
    document: &mut dyn FnMut(Option<String>) -> Result<bool, CorpusError>,
) -> Result<(), CorpusError> {
    let bad = |m: String| CorpusError::input(shown, None, m);
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
    let root = reader.metadata().file_metadata().schema_descr().root_schema().clone();
    let columns: Vec<&str> = root.get_fields().iter().map(|t| t.name()).collect();
    let column = root
        .get_fields()
        .iter()
        .find(|t| t.name() == field)
        .ok_or_else(|| bad(format!("no column {field:?} (columns: {}); choose one with --text-field", columns.join(", "))))?
        .clone();
    if !holds_strings(&column) {
        return Err(bad(format!("column {field:?} does not hold strings (a {:?} column)", describe(&column))));
    }
    let projection = Type::group_type_builder(root.name())
        .with_fields(vec![column])
        .build()
        .map_err(|e| bad(format!("projecting column {field:?}: {e}")))?;
    let leaf = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.path().parts() == [field.to_string()])
        .ok_or_else(|| bad(format!("column {field:?} has no leaf column")))?;
    let mut i = 0usize; // rows read, over every row group
    let of = reader.num_row_groups();
    for g in 0..of {
        let (start, len) = reader.metadata().row_group(g).column(leaf).byte_range();
        row_group(RowGroupAt { index: g, of, start, len }).map_err(|e| bad(format!("row group {g}: {e}")))?;
        let group = reader.get_row_group(g).map_err(|e| bad(format!("row group {g}: {e}")))?;
        let rows = group.get_row_iter(Some(projection.clone())).map_err(|e| bad(format!("reading column {field:?}: {e}")))?;
        for row in rows {
            let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
            let text = match row.get_column_iter().next().map(|(_, f)| f) {
                Some(Field::Str(s)) => Some(s.clone()),
                Some(Field::Null) | None => None,
                Some(other) => {
                    let mut shown_value = format!("{other:?}");
                    shown_value.truncate(shown_value.floor_char_boundary(80));
                    return Err(bad(format!("row {i}: column {field:?} holds {shown_value}, not a string")));
                }
            };
            if !document(text)? {
                return Ok(());
            }
            i += 1;
        }
    }
    Ok(())
}

/// A UTF-8 string column: BYTE_ARRAY annotated as a string (pyarrow's `string` and
/// `large_string` both are), one per row (not repeated), not a list, struct or plain binary.
fn holds_strings(t: &Type) -> bool {
    t.is_primitive()
        && t.get_basic_info().repetition() != Repetition::REPEATED
        && t.get_physical_type() == PhysicalType::BYTE_ARRAY
        && (matches!(t.get_basic_info().logical_type_ref(), Some(LogicalType::String)) || t.get_basic_info().converted_type() == ConvertedType::UTF8)
}

fn describe(t: &Type) -> String {
    if t.is_primitive() {
        format!("{:?} {:?}", t.get_physical_type(), t.get_basic_info().logical_type_ref())
    } else {
        "group".to_string()
    }
}
