//! What a device says it can do ([`Manifest`], [`ToolDescriptor`]) and what a mutation
//! proposes before it is approved ([`Plan`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a tool is run: reads and actions on arrival, mutations through propose and apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ToolClass {
    Read,
    Mutate,
    Action,
}

/// An MCP-shaped description of one tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ToolDescriptor {
    pub name: String,
    pub description: String,
    /// A JSON Schema for the tool's input.
    pub input_schema: Value,
    pub class: ToolClass,
}

/// The body of `PUT /api/host/manifest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub tools: Vec<ToolDescriptor>,
    pub roots: Vec<String>,
    pub version: String,
    pub platform: String,
}

/// A mutation's proposal: the `result` of a [`crate::HostResult`] whose `proposal` is true.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub tool: String,
    /// One human-readable line: what the apply would do.
    pub summary: String,
    /// A unified diff, where the change is to text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// What the apply verifies before it changes anything (content hashes, or absence).
    pub preconditions: Value,
}
