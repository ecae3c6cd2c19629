//! `ifc_inventory`, a domain tool written in Rust: reads an IFC model (the ISO 10303-21 "STEP"
//! text form that every BIM tool exports) and writes a CSV inventory beside it, one row per
//! entity type (`IFCWALL,42`), so a model's contents can be compared or charted without a BIM
//! viewer.
//!
//! It is a mutation: `plan` reads the model, builds the CSV, and proposes it as a diff against
//! the current output file, with that file's state as the precondition; the toolbox calls `run`
//! only on approval, after the precondition held again, and `run` writes the file atomically
//! through the scope. Paths come in as text and go through the [`Context`], never `std::fs`.
//!
//! Does not: check the model against a schema; a statement that does not read as
//! `#id = TYPE(...)` is counted under `malformed`.

use std::collections::BTreeMap;
use std::io::Read;

use host_agent::scope::ScopedPath;
use host_agent::tools::{parse_input, schema_for, text_diff, Context, Proposal, Tool, ToolError};
use protocol::{ToolClass, ToolDescriptor};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// The tool's name in the manifest.
pub const NAME: &str = "ifc_inventory";
/// Models larger than this are refused.
pub const MAX_MODEL_BYTES: u64 = 512 << 20;

/// The input: serde validates it, schemars describes it, from this one type.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The IFC model (.ifc), inside the allowed roots.
    pub model: String,
    /// Where to write the CSV. Default: beside the model, `<model>.inventory.csv`.
    #[serde(default)]
    pub output: Option<String>,
}

/// What a model holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// `FILE_SCHEMA` of the header, e.g. `IFC4`.
    pub schema: Option<String>,
    /// Entities per type, upper case.
    pub counts: BTreeMap<String, u64>,
    /// Statements of the data section that are not `#id = TYPE(...)`.
    pub malformed: u64,
}

impl Inventory {
    pub fn entities(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The CSV the tool writes: a header, then `type,count` rows by type name.
    pub fn to_csv(&self) -> String {
        let mut csv = String::from("type,count\n");
        for (kind, count) in &self.counts {
            csv.push_str(&format!("{kind},{count}\n"));
        }
        if self.malformed > 0 {
            csv.push_str(&format!("malformed,{}\n", self.malformed));
        }
        csv
    }
}

/// Reads an ISO 10303-21 text: statements end with `;` outside quoted strings ('' escapes a
/// quote) and comments (`/* */`); `FILE_SCHEMA` names the schema; the DATA section holds the
/// entities. Pure: table-tested below.
pub fn inventory(text: &str) -> Inventory {
    let mut inventory = Inventory::default();
    let mut statement = String::new();
    let mut in_data = false;
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            statement.push(c);
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    statement.push(chars.next().unwrap_or('\''));
                } else {
                    in_string = false;
                }
            }
            continue;
        }
        match c {
            '\'' => {
                in_string = true;
                statement.push(c);
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            ';' => {
                take_statement(statement.trim(), &mut in_data, &mut inventory);
                statement.clear();
            }
            c => statement.push(c),
        }
    }
    inventory
}

fn take_statement(statement: &str, in_data: &mut bool, inventory: &mut Inventory) {
    let upper_start: String = statement.chars().take(16).collect::<String>().to_ascii_uppercase();
    if upper_start == "DATA" {
        *in_data = true;
    } else if upper_start == "ENDSEC" {
        *in_data = false;
    } else if upper_start.starts_with("FILE_SCHEMA") {
        inventory.schema = statement.split('\'').nth(1).map(str::to_owned);
    } else if *in_data && !statement.is_empty() {
        match entity_type(statement) {
            Some(kind) => *inventory.counts.entry(kind).or_default() += 1,
            None => inventory.malformed += 1,
        }
    }
}

/// `IFCWALL` of `#12 = IfcWall('…',…)`.
fn entity_type(statement: &str) -> Option<String> {
    let rest = statement.strip_prefix('#')?;
    let (id, rest) = rest.split_once('=')?;
    if id.trim().is_empty() || !id.trim().chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (kind, _) = rest.trim_start().split_once('(')?;
    let kind = kind.trim();
    let valid = !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then(|| kind.to_ascii_uppercase())
}

/// The tool itself: no state, all of it comes with the call.
#[derive(Debug, Clone, Copy, Default)]
pub struct IfcInventory;

/// The model and output of a call, resolved, and the CSV the model gives.
struct Planned {
    model: ScopedPath,
    output: ScopedPath,
    inventory: Inventory,
}

impl IfcInventory {
    fn prepare(&self, ctx: &Context, input: &Value) -> Result<Planned, ToolError> {
        let input: Input = parse_input(NAME, input)?;
        let model = ctx.resolve(&input.model)?;
        let output = match &input.output {
            Some(output) => ctx.resolve(output)?,
            None => ctx.resolve(&format!("{}.inventory.csv", input.model.trim_end_matches(['/', '\\'])))?,
        };
        if output == model {
            return Err(ToolError::Refused("the output would overwrite the model".into()));
        }
        let shown = ctx.scope().display(&model);
        let io = |error| ToolError::io(shown.clone(), error);
        let file = ctx.scope().open_file(&model).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size > MAX_MODEL_BYTES {
            return Err(ToolError::Refused(format!("{shown} is larger than {MAX_MODEL_BYTES} bytes")));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut reader = file.take(MAX_MODEL_BYTES);
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            ctx.deadline().check()?;
            let read = reader.read(&mut chunk).map_err(io)?;
            if read == 0 {
                break;
            }
            bytes.extend_from_slice(&chunk[..read]);
        }
        let inventory = inventory(&String::from_utf8_lossy(&bytes));
        if inventory.entities() == 0 {
            return Err(ToolError::Refused(format!("{shown} holds no IFC entities (is it an .ifc STEP file?)")));
        }
        Ok(Planned { model, output, inventory })
    }
}

impl Tool for IfcInventory {
    fn descriptor(&self) -> ToolDescriptor {
        ToolDescriptor {
            name: NAME.into(),
            description: "Count the entities of an IFC model by type and write the inventory as CSV beside it \
                          (a proposal: applied on approval)"
                .into(),
            input_schema: schema_for::<Input>(),
            class: ToolClass::Mutate,
        }
    }

    fn plan(&self, ctx: &Context, input: &Value) -> Result<Proposal, ToolError> {
        let planned = self.prepare(ctx, input)?;
        let target = ctx.condition(&planned.output)?;
        let csv = planned.inventory.to_csv();
        let old = match ctx.scope().open_file(&planned.output) {
            Ok(mut file) => {
                let mut old = Vec::new();
                file.read_to_end(&mut old).map_err(|error| ToolError::io(target.path.clone(), error))?;
                Some(old)
            }
            Err(_) => None,
        };
        let summary = format!(
            "write the inventory of {} ({} entities of {} types{}) to {}",
            ctx.scope().display(&planned.model),
            planned.inventory.entities(),
            planned.inventory.counts.len(),
            planned.inventory.schema.as_ref().map(|schema| format!(", {schema}")).unwrap_or_default(),
            target.path
        );
        let mut proposal = Proposal::new(summary).with_precondition("output", target.clone());
        if let Some(diff) = text_diff(&target.path, old.as_deref(), Some(csv.as_bytes())) {
            proposal = proposal.with_diff(diff);
        }
        Ok(proposal)
    }

    fn run(&self, ctx: &Context, input: &Value) -> Result<Value, ToolError> {
        let planned = self.prepare(ctx, input)?;
        let csv = planned.inventory.to_csv();
        let written = ctx.write_file(&planned.output, csv.as_bytes())?;
        Ok(json!({
            "output": ctx.scope().display(&planned.output),
            "bytes": written,
            "entities": planned.inventory.entities(),
            "types": planned.inventory.counts.len(),
            "schema": planned.inventory.schema,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const MODEL: &str = "ISO-10303-21;\nHEADER;\nFILE_DESCRIPTION(('ViewDefinition [CoordinationView]'),'2;1');\n\
FILE_SCHEMA(('IFC4'));\nENDSEC;\nDATA;\n#1= IFCPROJECT('0YvctVUKr0kugbFTf53O9L',$,'Demo; with a semicolon',$,$,$,$,$,$);\n\
#2 = IfcWall('2O2Fr$t4X7Zf8NOew3FLOH',$,'It''s a wall',$,$,$,$,$,$);\n/* a comment; with a semicolon */\n\
#3= IFCWALL('1',$,'multi\nline',$,$,$,$,$,$);\n#4= IFCDOOR('2',$,$,$,$,$,$,$,$,$,$,$,$);\nnot an entity;\nENDSEC;\nEND-ISO-10303-21;\n";

    #[test]
    fn counts_entities_by_type() {
        let found = inventory(MODEL);
        assert_eq!(found.schema.as_deref(), Some("IFC4"));
        assert_eq!(
            found.counts,
            BTreeMap::from([("IFCDOOR".into(), 1), ("IFCPROJECT".into(), 1), ("IFCWALL".into(), 2)])
        );
        assert_eq!(found.malformed, 1);
        assert_eq!(found.to_csv(), "type,count\nIFCDOOR,1\nIFCPROJECT,1\nIFCWALL,2\nmalformed,1\n");
    }

    #[test]
    fn statement_shapes() {
        assert_eq!(entity_type("#12= IFCWALL('x')").as_deref(), Some("IFCWALL"));
        assert_eq!(entity_type("#12 =IfcSlab ( 'x' )").as_deref(), Some("IFCSLAB"));
        for bad in ["IFCWALL('x')", "#= IFCWALL('x')", "#a= IFCWALL('x')", "#1= ('x')", "#1= IFC WALL('x')"] {
            assert_eq!(entity_type(bad), None, "{bad}");
        }
        assert_eq!(inventory("").entities(), 0);
    }
}
