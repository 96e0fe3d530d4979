/*
 * Workflow builder: a Drawflow node editor and a JSON editor over one
 * workflow definition.
 *
 * The definition object (state.definition) is the source of truth.  Every
 * edit changes it first.  The graph is then redrawn from it whenever the set
 * of nodes, ports or connections changed, and the JSON tab prints it.  Node
 * positions are not part of the definition: they are kept in memory, keyed by
 * section and name, and a reloaded workflow is laid out automatically.
 *
 * Stable hooks for browser tests
 *   #builder[data-ready="true"]   set once the blocks are loaded and the graph is drawn.
 *   Palette items                 [data-block-type="<type>"]: a block's full type, or
 *                                 WorkflowImage, WorkflowParameter, JsonField for the
 *                                 image input, parameter and output nodes.  Click adds
 *                                 the node, drag drops it where released.
 *   Nodes                         .drawflow-node with data-step-name="<step>", or
 *                                 data-input-name / data-output-name for inputs and
 *                                 outputs.  Class has-error while the server reports a
 *                                 problem on the node.
 *   Ports                         .input / .output dots inside a node, with
 *                                 data-port="<field or output name>".
 *   Side panel                    #node-panel shows the selected node.  Field controls
 *                                 are [data-field="<name>"]; the node's name is
 *                                 [data-field="name"] and applies on change (Enter or
 *                                 blur), every other field on input.
 *   Field errors                  .field-error next to the field, present only while
 *                                 the field has a problem.  #problems lists them all.
 *   Tabs                          #tab-graph, #tab-json.  JSON text #definition-json,
 *                                 JSON syntax error #json-error.
 *   Saving                        #workflow-name, #save.  #saved-version shows
 *                                 "Version N" (or "Saved as version N", or "Version N,
 *                                 unsaved changes" after an edit) and carries
 *                                 data-version="N".  Every save of an existing
 *                                 workflow sends base_version N and the revision
 *                                 it loaded or last saved as base_revision, so a
 *                                 rename in another tab is not undone.  A 409
 *                                 version_conflict shows in #save-message, and the
 *                                 edits stay in the page.  After a 404 (the workflow
 *                                 was deleted), the next save creates a new one.
 *                                 One save is on its way at a time: #save is
 *                                 disabled meanwhile, and a double-click saves once.
 *   Validation                    #validation-status[data-state] is idle, pending,
 *                                 valid, invalid or error.
 *   Leaving the page with unsaved changes raises a beforeunload prompt, and
 *   so does JSON text that does not parse.
 *
 * window.glassboxBuilder, for tests and the console
 *   ready                          Promise that resolves once the builder is usable.
 *   addStep(type, name?)           Add a node of a palette type and return its name.
 *                                  The name defaults to one derived from the type.
 *   connect(fromNode, fromOutput, toNode, toField)
 *                                  Wire $steps.fromNode.fromOutput (or $inputs.fromNode
 *                                  when fromOutput is null) into field toField of step
 *                                  toNode (or into output toNode when toField is null).
 *   setField(stepName, field, value)  Set a step field; undefined removes it.
 *   getDefinition() / setDefinition(definition)
 *   validate()                     Validate now; Promise of {ok, errors, warnings, message}.
 *   save()                         Save now; Promise of {ok, version, message}, with
 *                                  conflict: true when a newer version exists.
 */
(function () {
  "use strict";

  const VALIDATE_DELAY_MS = 400;
  const JSON_APPLY_DELAY_MS = 300;

  // Node geometry.  builder.css uses the same head and row heights, so the
  // port dots Drawflow draws line up with the labels inside the node.
  const NODE_WIDTH_PX = 220;
  const NODE_HEAD_PX = 46;
  const NODE_ROW_PX = 24;
  const NODE_PADDING_PX = 8;
  const LAYOUT_COLUMN_PX = 290;
  const LAYOUT_GAP_PX = 36;
  const LAYOUT_MARGIN_PX = 40;
  // Placing a clicked node: the grid step searched, the margin kept from the
  // canvas edges, and the height of the zoom buttons at the canvas bottom.
  const PLACEMENT_STEP_PX = 20;
  const VIEW_MARGIN_PX = 12;
  const CANVAS_TOOLS_PX = 44;
  // The smallest zoom, for the zoom buttons and for fitting the whole graph
  // on load. Drawflow 0.0.60's own minimum, 0.5, leaves a workflow of five
  // columns wider than the canvas in a 1280 px window.
  const ZOOM_MIN = 0.2;
  // How far an arrow key moves the focused node, in canvas pixels. Shift
  // moves it five times as far.
  const KEY_MOVE_PX = 20;
  const ARROW_STEPS = {
    ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1],
  };

  const SECTIONS = ["inputs", "steps", "outputs"];
  const IMAGE_INPUT_TYPES = ["WorkflowImage", "InferenceImage"];
  const PARAMETER_INPUT_TYPES = ["WorkflowParameter", "InferenceParameter"];
  const OUTPUT_TYPE = "JsonField";
  const VALUE_KIND = "value";
  const ANY_KIND = "*";
  // The kind of a field that lists steps by "$steps.<name>" (continue if's next_steps).
  const STEPS_KIND = "step";
  const ALL_OUTPUTS = "*";
  // The same grammar as SELECTOR_PATTERN in workflows/compiler/parse.py.
  const SELECTOR_PATTERN = /^\$(?:inputs\.([^.\s]+)|steps\.([^.\s]+)\.([^.\s]+))$/;
  const DRAG_MIME = "application/x-glassbox-block";
  const DATASET_NAME = { inputs: "inputName", steps: "stepName", outputs: "outputName" };

  // Palette entries that are not blocks: they add definition inputs and outputs.
  const SPECIAL_NODES = [
    {
      type: "WorkflowImage", section: "inputs", title: "Image input", name: "image",
      description: "An image passed in when the workflow runs.",
    },
    {
      type: "WorkflowParameter", section: "inputs", title: "Parameter", name: "parameter",
      description: "A value passed in when the workflow runs, with an optional default.",
    },
    {
      type: OUTPUT_TYPE, section: "outputs", title: "Output", name: "output",
      description: "A value the workflow returns, picked by a selector.",
    },
  ];

  const state = {
    definition: null,
    blocks: [],
    // Block manifests by full type, type without namespace, and alias.
    blockIndex: new Map(),
    // Model ids to suggest for a model_id field: [{id, note}] (builder-config).
    models: [],
    workflowId: null,
    savedVersion: null,
    savedRevision: null,
    // Counts edits, so a save that finishes after a later edit leaves the page dirty.
    changeCount: 0,
    savedChangeCount: 0,
    // True while a save request is on its way.
    saving: false,
    // The cause of the save error on screen ("json", "name" or "definition"),
    // so that clearSaveError removes it once fixed. Null for other messages.
    saveErrorCause: null,
    // "<section>:<name>" -> {x, y} in canvas coordinates.
    positions: new Map(),
    // Drawflow node id -> {section, item, ports}; item is the definition object itself.
    nodes: new Map(),
    // {section, item} of the node shown in the side panel, or null.
    selected: null,
    // Problems found in the browser (a duplicate name), by field, for the selected node.
    localErrors: new Map(),
    // blocks_errors of the latest validation or save, as the server sent them.
    serverErrors: [],
    // A problem that belongs to no node (a failed request, a non-definition error).
    generalError: null,
    warnings: [],
    graphSignature: null,
    activeTab: "graph",
    // True while the builder itself changes the graph, so Drawflow's events are ignored.
    syncing: false,
    validationSeq: 0,
  };
  let editor = null;
  let validateTimer = null;
  let jsonTimer = null;
  let graphTimer = null;
  const dom = {};

  // ---------------------------------------------------------------------
  // Small helpers

  function isPlainObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  function el(tag, attributes = {}, ...children) {
    const element = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes)) {
      if (value === null || value === undefined || value === false) continue;
      element.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) element.append(child);
    }
    return element;
  }

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  function prettyJson(value) {
    return JSON.stringify(value, null, 2);
  }

  function clone(value) {
    return JSON.parse(JSON.stringify(value));
  }

  function emptyDefinition() {
    return {
      version: "1.0",
      inputs: [{ type: "WorkflowImage", name: "image" }],
      steps: [],
      outputs: [],
    };
  }

  // ---------------------------------------------------------------------
  // The definition: sections, items, selectors, ports

  function sectionItems(section) {
    const items = state.definition[section];
    return Array.isArray(items) ? items : [];
  }

  function ensureSection(section) {
    if (!Array.isArray(state.definition[section])) state.definition[section] = [];
    return state.definition[section];
  }

  function findItem(section, name) {
    return sectionItems(section).find((item) => isPlainObject(item) && item.name === name)
      || null;
  }

  // Every object item of the three sections; anything else is left to the
  // server's validation to report.
  function entities() {
    const list = [];
    for (const section of SECTIONS) {
      for (const item of sectionItems(section)) {
        if (isPlainObject(item)) list.push({ section, item });
      }
    }
    return list;
  }

  // A definition typed on the JSON tab may leave an item without a name,
  // which the server's validation then reports.
  function hasName(item) {
    return item.name !== undefined && item.name !== null && item.name !== "";
  }

  // The name a node, the side panel and the problem list show.
  function displayName(item) {
    return hasName(item) ? String(item.name) : "(no name)";
  }

  function positionKey(section, item) {
    return `${section}:${item.name}`;
  }

  function indexBlocks(blocks) {
    state.blocks = blocks;
    state.blockIndex.clear();
    for (const block of blocks) {
      const withoutNamespace = block.type.split("/").slice(1).join("/");
      for (const name of [block.type, withoutNamespace, ...(block.aliases || [])]) {
        if (name) state.blockIndex.set(name, block);
      }
    }
  }

  // Steps may spell a field the way Roboflow's blocks also accept it
  // ("image" for "images"). The graph and the panel read fields by name, so
  // such keys are renamed to the field's name, in place. Returns the
  // renames, as "step: alias → name".
  function useFieldNames(definition) {
    const renamed = [];
    const steps = definition && Array.isArray(definition.steps) ? definition.steps : [];
    for (const step of steps) {
      const block = step && typeof step === "object" ? blockFor(step.type) : null;
      if (!block) continue;
      for (const field of block.fields) {
        if (field.name in step) continue;
        const alias = (field.aliases || []).find((name) => name in step);
        if (alias === undefined) continue;
        renameKey(step, alias, field.name);
        renamed.push(`${step.name}: ${alias} → ${field.name}`);
      }
    }
    return renamed;
  }

  // Rename a key of object, keeping the keys' order.
  function renameKey(object, from, to) {
    const entries = Object.entries(object);
    for (const key of Object.keys(object)) delete object[key];
    for (const [key, value] of entries) object[key === from ? to : key] = value;
  }

  function blockFor(type) {
    return typeof type === "string" ? state.blockIndex.get(type) || null : null;
  }

  function parseSelector(value) {
    if (typeof value !== "string") return null;
    const match = SELECTOR_PATTERN.exec(value);
    if (!match) return null;
    return match[1] !== undefined ? { input: match[1] } : { step: match[2], output: match[3] };
  }

  function isSelector(value) {
    return parseSelector(value) !== null;
  }

  function selectorFor(section, item, port) {
    return section === "inputs" ? `$inputs.${item.name}` : `$steps.${item.name}.${port}`;
  }

  // The node and output port a selector points at, or null.
  function sourceOfSelector(selector) {
    const reference = parseSelector(selector);
    if (!reference) return null;
    if (reference.input !== undefined) {
      const item = findItem("inputs", reference.input);
      return item && { section: "inputs", item, port: "value" };
    }
    const item = findItem("steps", reference.step);
    return item && { section: "steps", item, port: reference.output };
  }

  // The compiler takes a WorkflowBatchInput only as a batch of images.
  function isImageInput(item) {
    return IMAGE_INPUT_TYPES.includes(item.type) || item.type === "WorkflowBatchInput";
  }

  function inputKind(item) {
    return isImageInput(item) ? "image" : VALUE_KIND;
  }

  // Output names of a step with an unknown type that other nodes select.
  function referencedOutputs(stepName) {
    const names = new Set();
    const visit = (value) => {
      const reference = parseSelector(value);
      if (reference && reference.step === stepName && reference.output !== ALL_OUTPUTS) {
        names.add(reference.output);
      }
    };
    for (const { section, item } of entities()) {
      if (section === "steps") Object.values(item).forEach(visit);
      if (section === "outputs") visit(item.selector);
    }
    return [...names];
  }

  // Ports of a node.  Input ports are the fields that take a selector: those of
  // a selector kind, plus value fields that currently contain a selector.  Output
  // ports are what other nodes can select.
  function portsOf(section, item) {
    if (section === "inputs") {
      return { inputs: [], outputs: [{ name: "value", kind: inputKind(item) }] };
    }
    if (section === "outputs") {
      return { inputs: [{ name: "selector", kind: ANY_KIND }], outputs: [] };
    }
    const block = blockFor(item.type);
    if (block) {
      const inputs = block.fields
        .filter((field) => !editedAsJson(field) || isSelector(item[field.name]))
        .map((field) => ({ name: field.name, kind: field.kind }));
      const outputs = Object.entries(block.outputs).map(([name, kind]) => ({ name, kind }));
      outputs.push({ name: ALL_OUTPUTS, kind: ANY_KIND });
      return { inputs, outputs };
    }
    // Unknown type: show the connections the definition makes, so none are hidden.
    const inputs = Object.keys(item)
      .filter((key) => key !== "type" && key !== "name" && isSelector(item[key]))
      .map((name) => ({ name, kind: ANY_KIND }));
    const outputs = referencedOutputs(item.name).map((name) => ({ name, kind: ANY_KIND }));
    outputs.push({ name: ALL_OUTPUTS, kind: ANY_KIND });
    return { inputs, outputs };
  }

  // Whether the panel edits a field as JSON: values, and the objects and
  // lists of selectors that mapping, sequence and step-list fields take. A
  // port takes one selector, so only a field of one selector gets a port.
  function editedAsJson(field) {
    return field.kind === VALUE_KIND || field.kind === STEPS_KIND
      || Boolean(field.mapping) || Boolean(field.sequence);
  }

  function kindClass(kind) {
    if (kind === "object_detection_prediction") return "detections";
    if (kind === ANY_KIND) return "any";
    return kind === "image" ? "image" : "value";
  }

  function kindLabel(kind) {
    if (kind === "object_detection_prediction") return "detections";
    return kind === ANY_KIND ? "any" : kind;
  }

  // Whether a field of kind fieldKind may select a source of kind sourceKind.
  // Mirrors the compiler: image fields take image inputs and outputs, value
  // fields take parameters and value outputs, "*" takes anything.
  function kindAccepts(fieldKind, sourceKind) {
    return fieldKind === ANY_KIND || fieldKind === sourceKind;
  }

  // Selectors a field of the given kind could use, for the field's suggestions.
  function selectorChoices(kind, exceptItem) {
    const choices = [];
    for (const input of sectionItems("inputs")) {
      if (!isPlainObject(input)) continue;
      if (kind === "output" || kindAccepts(kind, inputKind(input))) {
        choices.push(`$inputs.${input.name}`);
      }
    }
    for (const step of sectionItems("steps")) {
      if (!isPlainObject(step) || step === exceptItem) continue;
      for (const port of portsOf("steps", step).outputs) {
        const usable = kind === "output"
          || (port.name !== ALL_OUTPUTS && kindAccepts(kind, port.kind));
        if (usable) choices.push(`$steps.${step.name}.${port.name}`);
      }
    }
    return choices;
  }

  function uniqueName(section, base) {
    let name = base;
    for (let counter = 2; findItem(section, name); counter += 1) name = `${base}_${counter}`;
    return name;
  }

  function specialNode(type) {
    return SPECIAL_NODES.find((entry) => entry.type === type) || null;
  }

  function defaultNameFor(type) {
    const special = specialNode(type);
    if (special) return special.name;
    const title = blockFor(type).title;
    return title.toLowerCase().replace(/[^a-z0-9]+/g, "_").replace(/^_+|_+$/g, "") || "step";
  }

  // Point every selector at oldName to newName, after a rename.
  function renameReferences(section, oldName, newName) {
    const rewrite = (value) => {
      const reference = parseSelector(value);
      if (!reference) return value;
      if (section === "inputs" && reference.input === oldName) return `$inputs.${newName}`;
      if (section === "steps" && reference.step === oldName) {
        return `$steps.${newName}.${reference.output}`;
      }
      return value;
    };
    for (const { section: where, item } of entities()) {
      if (where === "inputs") continue;
      const block = where === "steps" ? blockFor(item.type) : null;
      for (const key of Object.keys(item)) {
        if (key === "type" || key === "name") continue;
        const rewritten = rewrite(item[key]);
        if (rewritten !== item[key]) item[key] = rewritten;
      }
      // Each value of a mapping field (the filter's operations_parameters)
      // and each item of a sequence field may be a selector of its own, and a
      // step-list field names steps as "$steps.<name>".
      for (const field of block ? block.fields : []) {
        const value = item[field.name];
        if (field.mapping && isPlainObject(value)) {
          for (const key of Object.keys(value)) value[key] = rewrite(value[key]);
        } else if (field.sequence && Array.isArray(value)) {
          value.forEach((entry, index) => { value[index] = rewrite(entry); });
        } else if (field.kind === STEPS_KIND && section === "steps" && Array.isArray(value)) {
          value.forEach((entry, index) => {
            if (entry === `$steps.${oldName}`) value[index] = `$steps.${newName}`;
          });
        }
      }
    }
  }

  // Value fields accept JSON; text that is not JSON is taken as a string, so
  // model ids need no quotes.  An empty field is removed from the step.
  function parseValue(text) {
    if (text.trim() === "") return undefined;
    try {
      const value = JSON.parse(text);
      // JSON.parse reads 1e309 as Infinity, which JSON.stringify then writes
      // as null; keeping the text makes the server's error show what was typed.
      return typeof value === "number" && !Number.isFinite(value) ? text : value;
    } catch (error) {
      return text;
    }
  }

  // The inverse of parseValue: strings that would parse as JSON (such as "0.5")
  // are shown quoted so they stay strings.
  function formatValue(value) {
    if (value === undefined) return "";
    if (typeof value !== "string") return JSON.stringify(value);
    try {
      JSON.parse(value);
      return JSON.stringify(value);
    } catch (error) {
      return value;
    }
  }

  // ---------------------------------------------------------------------
  // Changes

  // Call after every change of state.definition.  Options: redrawPanel to
  // rebuild the side panel, deferGraph inside Drawflow's event handlers (the
  // graph must not be rebuilt while Drawflow is still handling the event), and
  // source "json" when the JSON tab made the change.
  function definitionChanged(options = {}) {
    state.changeCount += 1;
    if (options.deferGraph) scheduleGraphSync();
    else syncGraph();
    if (state.activeTab === "json" && options.source !== "json") {
      dom.json.value = prettyJson(state.definition);
    }
    if (options.redrawPanel) renderPanel();
    scheduleValidation();
    showUnsavedChanges();
  }

  function isDirty() {
    return state.changeCount !== state.savedChangeCount;
  }

  // Mark the saved version as behind the page once the page holds edits made
  // after it, so that "Saved as version N" never stands next to unsaved work.
  function showUnsavedChanges() {
    if (state.savedVersion == null || !isDirty()) return;
    const text = `Version ${state.savedVersion}, unsaved changes`;
    // The element is a live region: rewriting the same text would announce it again.
    if (dom.savedVersion.textContent !== text) dom.savedVersion.textContent = text;
  }

  function setItemValue(item, key, value) {
    if (value === undefined) delete item[key];
    else item[key] = value;
    definitionChanged();
  }

  function select(entity) {
    state.selected = entity;
    state.localErrors.clear();
    renderPanel();
  }

  function isSelected(item) {
    return state.selected !== null && state.selected.item === item;
  }

  // Add a node of a palette type; returns the name used.
  function addNodeOfType(type, options = {}) {
    const special = specialNode(type);
    const section = special ? special.section : "steps";
    if (!special && !blockFor(type)) {
      throw new Error(`Unknown block type '${type}'; known types: `
        + state.blocks.map((block) => block.type).join(", "));
    }
    const name = options.name || uniqueName(section, defaultNameFor(type));
    if (findItem(section, name)) {
      throw new Error(`The workflow already has ${section.slice(0, -1)} '${name}'.`);
    }
    const item = { type: special ? type : blockFor(type).type, name };
    const height = nodeHeight(section, item);
    const position = options.position || freePosition(section, height);
    ensureSection(section).push(item);
    state.positions.set(positionKey(section, item), position);
    state.selected = { section, item };
    state.localErrors.clear();
    definitionChanged({ redrawPanel: true });
    // A node placed beyond the visible canvas (when it had no free spot)
    // is brought into view by zooming out.
    if (!options.position && !insideView(position, height)) fitView();
    return name;
  }

  function removeItem(section, item) {
    const items = sectionItems(section);
    const index = items.indexOf(item);
    if (index >= 0) items.splice(index, 1);
    if (isSelected(item)) select(null);
  }

  function rename(section, item, newName) {
    const oldName = item.name;
    if (newName === oldName) return null;
    if (newName === "") return "A name is required.";
    if (findItem(section, newName)) return `Another ${section.slice(0, -1)} is named '${newName}'.`;
    const position = state.positions.get(positionKey(section, item));
    item.name = newName;
    if (position) state.positions.set(positionKey(section, item), position);
    renameReferences(section, oldName, newName);
    definitionChanged();
    return null;
  }

  // Replace the whole definition, keeping the selection when a node of the
  // same name exists.  source is "json" when the JSON tab made the change.
  function replaceDefinition(definition, source) {
    const previous = state.selected;
    state.definition = definition;
    // applyJsonText has renamed the keys of what the JSON tab sends.
    if (source !== "json") useFieldNames(definition);
    state.selected = previous && findItem(previous.section, previous.item.name)
      ? { section: previous.section, item: findItem(previous.section, previous.item.name) }
      : null;
    definitionChanged({ source, redrawPanel: true });
  }

  // ---------------------------------------------------------------------
  // The graph

  function createEditor() {
    const instance = new Drawflow(dom.canvas);
    instance.curvature = 0.45;
    instance.zoom_min = ZOOM_MIN;
    instance.start();
    instance.on("connectionCreated", onConnectionCreated);
    instance.on("connectionRemoved", onConnectionRemoved);
    instance.on("nodeRemoved", onNodeRemoved);
    instance.on("nodeSelected", (id) => {
      const node = state.nodes.get(String(id));
      if (node) select({ section: node.section, item: node.item });
    });
    instance.on("nodeUnselected", () => select(null));
    // Drawflow cancels the mousedown on a line, so the canvas, where the
    // Delete key is handled, would not get the focus.
    instance.on("connectionSelected", () => dom.canvas.focus({ preventScroll: true }));
    return instance;
  }

  // Handle keys on the canvas for keyboard users. Tab reaches every node.
  // Enter or Space selects the focused node and opens it in the side panel,
  // and the arrow keys move it. Delete or Backspace removes the focused node,
  // else the selected node or line. This runs before Drawflow's own Delete
  // handler and stops it, because that one throws when a node was selected
  // before any mouse click on the canvas.
  function onCanvasKeydown(event) {
    if (state.activeTab !== "graph" || event.ctrlKey || event.metaKey || event.altKey) return;
    const focused = event.target.classList.contains("drawflow-node") ? event.target : null;
    if (event.key === "Delete" || event.key === "Backspace") {
      event.preventDefault();
      event.stopImmediatePropagation();
      deleteSelection(focused);
    } else if (focused && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      selectNodeElement(focused);
    } else if (focused && ARROW_STEPS[event.key]) {
      event.preventDefault();
      const [dx, dy] = ARROW_STEPS[event.key];
      const step = event.shiftKey ? 5 * KEY_MOVE_PX : KEY_MOVE_PX;
      moveNode(focused, dx * step, dy * step);
    }
  }

  function deleteSelection(focused) {
    const element = focused || editor.node_selected;
    if (element) {
      // Removing through Drawflow fires its events, which update the definition.
      editor.removeNodeId(element.id);
      if (editor.node_selected === element) editor.node_selected = null;
    } else if (editor.connection_selected) {
      editor.removeConnection();
    } else {
      return;
    }
    // The removed node may have had the focus, so move it to the canvas.
    dom.canvas.focus({ preventScroll: true });
  }

  function selectNodeElement(element) {
    const node = state.nodes.get(element.id.slice("node-".length));
    if (!node) return;
    markSelected(element);
    select({ section: node.section, item: node.item });
  }

  // Move a node as dragging it would: its element, Drawflow's copy of its
  // position, its lines, and the position kept for redraws.
  function moveNode(element, dx, dy) {
    const id = element.id.slice("node-".length);
    const node = state.nodes.get(id);
    if (!node) return;
    const x = parseFloat(element.style.left) + dx;
    const y = parseFloat(element.style.top) + dy;
    element.style.left = `${x}px`;
    element.style.top = `${y}px`;
    const data = editor.drawflow.drawflow[editor.module].data[id];
    data.pos_x = x;
    data.pos_y = y;
    editor.updateConnectionNodes(element.id);
    state.positions.set(positionKey(node.section, node.item), { x, y });
    revealNode(element);
  }

  function applyCanvasTransform() {
    editor.precanvas.style.transform =
      `translate(${editor.canvas_x}px, ${editor.canvas_y}px) scale(${editor.zoom})`;
  }

  // Pan the canvas so that a node (focused by Tab, or moved by a key) is in view.
  function revealNode(element) {
    const view = dom.canvas.getBoundingClientRect();
    const box = element.getBoundingClientRect();
    const left = view.left + VIEW_MARGIN_PX;
    const right = view.right - VIEW_MARGIN_PX;
    const top = view.top + VIEW_MARGIN_PX;
    const bottom = view.bottom - VIEW_MARGIN_PX - CANVAS_TOOLS_PX;
    let dx = 0;
    let dy = 0;
    if (box.left < left || box.width > right - left) dx = left - box.left;
    else if (box.right > right) dx = right - box.right;
    if (box.top < top || box.height > bottom - top) dy = top - box.top;
    else if (box.bottom > bottom) dy = bottom - box.bottom;
    if (dx === 0 && dy === 0) return;
    editor.canvas_x += dx;
    editor.canvas_y += dy;
    applyCanvasTransform();
  }

  function nodeElement(id) {
    return document.getElementById(`node-${id}`);
  }

  function nodeIdOf(item) {
    for (const [id, node] of state.nodes) {
      if (node.item === item) return id;
    }
    return null;
  }

  // A string that changes exactly when the graph would look different, apart
  // from positions and error marks.
  function graphSignature() {
    return JSON.stringify(entities().map(({ section, item }) => {
      const ports = portsOf(section, item);
      return [
        section, item.name, item.type,
        ports.inputs.map((port) => [port.name, item[port.name]]),
        ports.outputs.map((port) => port.name),
      ];
    }));
  }

  function scheduleGraphSync() {
    if (graphTimer !== null) return;
    graphTimer = setTimeout(() => {
      graphTimer = null;
      syncGraph();
    }, 0);
  }

  function syncGraph() {
    if (state.activeTab !== "graph") return;
    if (graphSignature() !== state.graphSignature) renderGraph();
    else decorateNodes();
  }

  // Read positions from the node elements.  Drawflow 0.0.60 also stores
  // pos_x/pos_y, but while dragging it computes them after moving the
  // element, so they end one mouse-move step past where the node is drawn.
  function capturePositions() {
    for (const id of state.nodes.keys()) {
      const element = nodeElement(id);
      if (!element) continue;
      const node = state.nodes.get(id);
      state.positions.set(positionKey(node.section, node.item),
        { x: parseFloat(element.style.left), y: parseFloat(element.style.top) });
    }
  }

  // Redraw every node and connection from the definition.  Nodes keep their
  // positions unless relayout is set or some node has none yet.  In those
  // cases all nodes are laid out again and the view is zoomed to fit them.
  function renderGraph({ relayout = false } = {}) {
    if (state.activeTab !== "graph") return;
    capturePositions();
    const all = entities();
    const laidOut = relayout
      || all.some(({ section, item }) => !state.positions.has(positionKey(section, item)));
    if (laidOut) layoutPositions(all);
    const idOf = new Map();
    state.syncing = true;
    try {
      editor.clear();
      // clear() drops the nodes' elements, so Drawflow's selection must go too.
      editor.node_selected = null;
      editor.connection_selected = null;
      state.nodes.clear();
      for (const entity of all) idOf.set(entity.item, addGraphNode(entity));
      for (const entity of all) connectGraphNode(entity, idOf);
    } finally {
      state.syncing = false;
    }
    state.graphSignature = graphSignature();
    if (state.selected && idOf.has(state.selected.item)) {
      markSelected(nodeElement(idOf.get(state.selected.item)));
    }
    decorateNodes();
    if (laidOut) fitView();
  }

  function nodeTitle(section, item) {
    if (section === "inputs") {
      return isImageInput(item) ? "Image input" : "Parameter";
    }
    if (section === "outputs") return "Output";
    const block = blockFor(item.type);
    return block ? block.title : "Unknown block";
  }

  function portLabel(section, port) {
    if (section === "inputs") return port.kind === "image" ? "image" : "value";
    return port.name === ALL_OUTPUTS ? "all outputs (*)" : port.name;
  }

  function nodeHtml(section, item, ports) {
    const rows = [];
    const count = Math.max(ports.inputs.length, ports.outputs.length);
    for (let index = 0; index < count; index += 1) {
      const input = ports.inputs[index];
      const output = ports.outputs[index];
      rows.push(
        '<div class="node-row">'
        + `<span class="port-label in">${input ? escapeHtml(portLabel(section, input)) : ""}</span>`
        + `<span class="port-label out">${output ? escapeHtml(portLabel(section, output)) : ""}</span>`
        + "</div>",
      );
    }
    return '<div class="node-head">'
      + `<span class="node-title">${escapeHtml(nodeTitle(section, item))}</span>`
      + `<span class="node-name">${escapeHtml(displayName(item))}</span>`
      + '<span class="node-problems" hidden></span>'
      + "</div>"
      + `<div class="node-rows">${rows.join("")}</div>`;
  }

  function nodeHeight(section, item) {
    const ports = portsOf(section, item);
    return NODE_HEAD_PX + NODE_ROW_PX * Math.max(ports.inputs.length, ports.outputs.length)
      + NODE_PADDING_PX;
  }

  function addGraphNode({ section, item }) {
    const ports = portsOf(section, item);
    const position = state.positions.get(positionKey(section, item));
    let classes = `node-${section.slice(0, -1)}`;
    if (section === "steps" && !blockFor(item.type)) classes += " node-unknown";
    const id = editor.addNode(section, ports.inputs.length, ports.outputs.length,
      position.x, position.y, classes, {}, nodeHtml(section, item, ports));
    const element = nodeElement(id);
    element.dataset[DATASET_NAME[section]] = String(item.name ?? "");
    element.tabIndex = 0;
    element.setAttribute("role", "button");
    element.setAttribute("aria-label", `${nodeTitle(section, item)} “${displayName(item)}”`);
    ports.inputs.forEach((port, index) => tagPort(element, `.input_${index + 1}`, port));
    ports.outputs.forEach((port, index) => tagPort(element, `.output_${index + 1}`, port));
    state.nodes.set(String(id), { section, item, ports });
    return id;
  }

  function tagPort(nodeEl, selector, port) {
    const dot = nodeEl.querySelector(selector);
    dot.dataset.port = port.name;
    dot.classList.add(`kind-${kindClass(port.kind)}`);
    dot.title = `${port.name} (${kindLabel(port.kind)})`;
  }

  function connectGraphNode({ section, item }, idOf) {
    const targetId = idOf.get(item);
    const ports = state.nodes.get(String(targetId)).ports;
    ports.inputs.forEach((port, index) => {
      const source = sourceOfSelector(item[port.name]);
      if (!source) return;
      const sourceId = idOf.get(source.item);
      const outputs = state.nodes.get(String(sourceId)).ports.outputs;
      const outputIndex = outputs.findIndex((output) => output.name === source.port);
      // An output the block does not have is drawn unconnected; the server
      // reports it on the field.
      if (outputIndex < 0) return;
      editor.addConnection(sourceId, targetId, `output_${outputIndex + 1}`,
        `input_${index + 1}`);
    });
  }

  function markSelected(element) {
    // Drawflow keeps its own selection, which the Delete key uses, so keep it
    // in step with the side panel. Like a click, selecting a node unselects a line.
    if (editor.node_selected && editor.node_selected !== element) {
      editor.node_selected.classList.remove("selected");
    }
    editor.node_selected = element;
    if (element) element.classList.add("selected");
    if (element && editor.connection_selected) {
      editor.connection_selected.classList.remove("selected");
      editor.connection_selected = null;
    }
  }

  function selectNode(item) {
    const id = nodeIdOf(item);
    if (id !== null) markSelected(nodeElement(id));
    const node = id !== null ? state.nodes.get(id) : null;
    if (node) select({ section: node.section, item });
  }

  function portIndex(portClass) {
    return Number(portClass.split("_")[1]) - 1;
  }

  function onConnectionCreated(connection) {
    if (state.syncing) return;
    const source = state.nodes.get(String(connection.output_id));
    const target = state.nodes.get(String(connection.input_id));
    if (!source || !target) return;
    const output = source.ports.outputs[portIndex(connection.output_class)];
    const input = target.ports.inputs[portIndex(connection.input_class)];
    // A field contains one selector, so a new connection replaces the old
    // one, and the redraw removes the old line.
    target.item[input.name] = selectorFor(source.section, source.item, output.name);
    definitionChanged({ deferGraph: true, redrawPanel: isSelected(target.item) });
  }

  function onConnectionRemoved(connection) {
    if (state.syncing) return;
    const source = state.nodes.get(String(connection.output_id));
    const target = state.nodes.get(String(connection.input_id));
    if (!source || !target) return;
    const output = source.ports.outputs[portIndex(connection.output_class)];
    const input = target.ports.inputs[portIndex(connection.input_class)];
    if (target.item[input.name] === selectorFor(source.section, source.item, output.name)) {
      delete target.item[input.name];
    }
    definitionChanged({ deferGraph: true, redrawPanel: isSelected(target.item) });
  }

  function onNodeRemoved(id) {
    if (state.syncing) return;
    const node = state.nodes.get(String(id));
    if (!node) return;
    state.nodes.delete(String(id));
    removeItem(node.section, node.item);
    definitionChanged({ deferGraph: true });
  }

  // Columns by dependency depth: inputs, then each step one column right of
  // the deepest step it reads from, then the outputs.  Within a column, nodes
  // are ordered by the mean row of their sources, which avoids most crossings.
  function layoutPositions(all) {
    const depths = new Map();
    const stepDepth = (item, visiting) => {
      if (depths.has(item)) return depths.get(item);
      if (visiting.has(item)) return 1; // a cycle; the server reports it
      visiting.add(item);
      let depth = 1;
      for (const source of sourcesOf("steps", item)) {
        if (source.section === "steps") depth = Math.max(depth, stepDepth(source.item, visiting) + 1);
      }
      visiting.delete(item);
      depths.set(item, depth);
      return depth;
    };
    let lastStepColumn = 0;
    for (const { section, item } of all) {
      if (section === "steps") lastStepColumn = Math.max(lastStepColumn, stepDepth(item, new Set()));
    }
    const columns = [];
    for (const entity of all) {
      let column = 0;
      if (entity.section === "steps") column = depths.get(entity.item);
      if (entity.section === "outputs") column = lastStepColumn + 1;
      (columns[column] = columns[column] || []).push(entity);
    }
    placeColumns(columns.filter(Boolean));
  }

  function sourcesOf(section, item) {
    return portsOf(section, item).inputs
      .map((port) => sourceOfSelector(item[port.name]))
      .filter(Boolean);
  }

  function placeColumns(columns) {
    const rowOf = new Map();
    const heights = [];
    for (const column of columns) {
      const order = (entity, index) => {
        const rows = sourcesOf(entity.section, entity.item)
          .map((source) => rowOf.get(source.item))
          .filter((row) => row !== undefined);
        return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : index;
      };
      const keyed = column.map((entity, index) => ({ entity, key: order(entity, index) }));
      keyed.sort((a, b) => a.key - b.key);
      column.splice(0, column.length, ...keyed.map(({ entity }) => entity));
      column.forEach((entity, index) => rowOf.set(entity.item, index));
      heights.push(column.reduce(
        (total, { section, item }) => total + nodeHeight(section, item) + LAYOUT_GAP_PX, 0));
    }
    const tallest = Math.max(...heights, 0);
    columns.forEach((column, columnIndex) => {
      // Centre each column on the tallest one.
      let y = LAYOUT_MARGIN_PX + (tallest - heights[columnIndex]) / 2;
      for (const { section, item } of column) {
        state.positions.set(positionKey(section, item),
          { x: LAYOUT_MARGIN_PX + columnIndex * LAYOUT_COLUMN_PX, y: Math.round(y) });
        y += nodeHeight(section, item) + LAYOUT_GAP_PX;
      }
    });
  }

  function autoLayout() {
    renderGraph({ relayout: true });
  }

  // Zoom out until every node fits, but never zoom in past 100%, and scroll
  // the top-left node into the corner of the canvas.
  function fitView() {
    const boxes = entities().map(({ section, item }) => {
      const position = state.positions.get(positionKey(section, item));
      return { ...position, right: position.x + NODE_WIDTH_PX, bottom: position.y + nodeHeight(section, item) };
    });
    if (boxes.length === 0) return;
    const left = Math.min(...boxes.map((box) => box.x)) - LAYOUT_MARGIN_PX;
    const top = Math.min(...boxes.map((box) => box.y)) - LAYOUT_MARGIN_PX;
    const width = Math.max(...boxes.map((box) => box.right)) - left + LAYOUT_MARGIN_PX;
    const height = Math.max(...boxes.map((box) => box.bottom)) - top + LAYOUT_MARGIN_PX;
    const view = dom.canvas.getBoundingClientRect();
    if (view.width === 0 || view.height === 0) return;
    const usableHeight = view.height - CANVAS_TOOLS_PX;
    const zoom = Math.max(editor.zoom_min, Math.min(1, view.width / width, usableHeight / height));
    editor.zoom = zoom;
    editor.zoom_refresh();
    // Drawflow's inner canvas keeps the default transform-origin (its middle),
    // so scaling also moves the content.  Measure where the canvas point
    // (left, top) ended up and shift it to the corner.
    const inner = editor.precanvas.getBoundingClientRect();
    editor.canvas_x += view.left - (inner.left + left * zoom);
    editor.canvas_y += view.top - (inner.top + top * zoom);
    applyCanvasTransform();
  }

  // Canvas coordinates of a point in the window, undoing Drawflow's pan and zoom.
  function canvasPoint(clientX, clientY) {
    const rect = editor.precanvas.getBoundingClientRect();
    return {
      x: Math.round((clientX - rect.left) / editor.zoom),
      y: Math.round((clientY - rect.top) / editor.zoom),
    };
  }

  // The part of the canvas on screen, in canvas coordinates, less a margin
  // and the zoom buttons' strip at the bottom.
  function visibleArea() {
    const rect = dom.canvas.getBoundingClientRect();
    const topLeft = canvasPoint(rect.left, rect.top);
    const bottomRight = canvasPoint(rect.right, rect.bottom);
    return {
      left: topLeft.x + VIEW_MARGIN_PX,
      top: topLeft.y + VIEW_MARGIN_PX,
      right: bottomRight.x - VIEW_MARGIN_PX,
      bottom: bottomRight.y - VIEW_MARGIN_PX - CANVAS_TOOLS_PX / editor.zoom,
    };
  }

  function insideView(position, height) {
    const view = visibleArea();
    return position.x >= view.left && position.y >= view.top
      && position.x + NODE_WIDTH_PX <= view.right && position.y + height <= view.bottom;
  }

  // Boxes of the nodes on the canvas, in canvas coordinates.
  function nodeBoxes() {
    return entities()
      .filter(({ section, item }) => state.positions.has(positionKey(section, item)))
      .map(({ section, item }) => {
        const position = state.positions.get(positionKey(section, item));
        return {
          section, x: position.x, y: position.y,
          right: position.x + NODE_WIDTH_PX, bottom: position.y + nodeHeight(section, item),
        };
      });
  }

  // Return where a new node of the section would go if that spot were free.
  // Inputs go left of every node. Other nodes go one column right of the
  // selected node, but a new output goes below a selected output, in its
  // column. Without a selection, steps go right of the inputs, and outputs
  // right of every input and step, where Auto layout puts them.
  function preferredPosition(section, boxes, view) {
    const top = boxes.length ? Math.min(...boxes.map((box) => box.y)) : view.top;
    if (section === "inputs") {
      const left = boxes.length ? Math.min(...boxes.map((box) => box.x)) : view.left;
      return { x: left, y: top };
    }
    const selected = state.selected
      && state.positions.get(positionKey(state.selected.section, state.selected.item));
    if (selected && section === "outputs" && state.selected.section === "outputs") {
      return { x: selected.x, y: selected.y };
    }
    if (selected) return { x: selected.x + LAYOUT_COLUMN_PX, y: selected.y };
    const columnGap = LAYOUT_COLUMN_PX - NODE_WIDTH_PX;
    const before = boxes.filter((box) => (section === "steps"
      ? box.section === "inputs" : box.section !== "outputs"));
    const x = before.length ? Math.max(...before.map((box) => box.right)) + columnGap : view.left;
    return { x, y: top };
  }

  // Choose the position of a node added by click (not drag): the free spot
  // inside the visible canvas nearest to preferredPosition, where spots left
  // of it count double so the node tends to sit right of its sources. An
  // output takes no spot left of preferredPosition, so it never lands left
  // of the node it reads from. Free means LAYOUT_GAP_PX from every node,
  // which leaves room for a connection line between neighbours outside both
  // nodes. Without any free spot in view, the node goes below the others in
  // its column, and the caller zooms out. newHeight is in canvas pixels.
  function freePosition(section, newHeight) {
    capturePositions();
    const boxes = nodeBoxes();
    const view = visibleArea();
    const preferred = preferredPosition(section, boxes, view);
    const searchLeft = section === "outputs" ? Math.max(view.left, preferred.x) : view.left;
    const free = (x, y) => !boxes.some((box) => box.x - LAYOUT_GAP_PX < x + NODE_WIDTH_PX
      && x < box.right + LAYOUT_GAP_PX
      && box.y - LAYOUT_GAP_PX < y + newHeight && y < box.bottom + LAYOUT_GAP_PX);
    const cost = (x, y) => {
      const dx = x - preferred.x;
      return (dx < 0 ? -2 * dx : dx) + Math.abs(y - preferred.y);
    };
    if (insideView(preferred, newHeight) && free(preferred.x, preferred.y)) {
      return { x: Math.round(preferred.x), y: Math.round(preferred.y) };
    }
    let best = null;
    for (let x = searchLeft; x + NODE_WIDTH_PX <= view.right; x += PLACEMENT_STEP_PX) {
      for (let y = view.top; y + newHeight <= view.bottom; y += PLACEMENT_STEP_PX) {
        if (!free(x, y)) continue;
        const spot = { x: Math.round(x), y: Math.round(y), cost: cost(x, y) };
        if (best === null || spot.cost < best.cost) best = spot;
      }
    }
    if (best) return { x: best.x, y: best.y };
    let position = { x: Math.round(preferred.x), y: Math.round(preferred.y) };
    while (!free(position.x, position.y)) {
      const below = boxes.filter((box) => box.x - LAYOUT_GAP_PX < position.x + NODE_WIDTH_PX
        && position.x < box.right + LAYOUT_GAP_PX && box.bottom + LAYOUT_GAP_PX > position.y);
      position = { x: position.x, y: Math.max(...below.map((box) => box.bottom)) + LAYOUT_GAP_PX };
    }
    return position;
  }

  // ---------------------------------------------------------------------
  // Problems reported by the server

  // Find the node and field a blocks_errors entry is about.  Steps are named
  // by block_id; inputs and outputs by property names such as
  // "inputs[0].name" or "outputs.count.selector".
  function resolveError(error) {
    const message = error.property_details;
    const property = error.property_name;
    let match;
    if (error.block_id) {
      return { section: "steps", item: findItem("steps", error.block_id), field: property, message };
    }
    if (property && (match = /^(inputs|outputs)\[(\d+)\](?:\.(\w+))?$/.exec(property))) {
      const item = sectionItems(match[1])[Number(match[2])];
      return {
        section: match[1], item: isPlainObject(item) ? item : null,
        field: match[3] || null, message,
      };
    }
    if (property && (match = /^outputs\.(.+)\.selector$/.exec(property))) {
      return { section: "outputs", item: findItem("outputs", match[1]), field: "selector", message };
    }
    // A step with an invalid name has no block_id; the message starts "steps[i]:".
    if (property === "name" && (match = /^steps\[(\d+)\]:/.exec(message))) {
      const item = sectionItems("steps")[Number(match[1])];
      return { section: "steps", item: isPlainObject(item) ? item : null, field: "name", message };
    }
    return { section: null, item: null, field: property, message };
  }

  function currentProblems() {
    const problems = state.serverErrors.map(resolveError);
    if (state.generalError) {
      problems.push({ section: null, item: null, field: null, message: state.generalError });
    }
    return problems;
  }

  function problemsOf(item) {
    return currentProblems().filter((problem) => problem.item === item);
  }

  function decorateNodes() {
    for (const [id, node] of state.nodes) {
      const element = nodeElement(id);
      if (!element) continue;
      const problems = problemsOf(node.item);
      element.classList.toggle("has-error", problems.length > 0);
      const badge = element.querySelector(".node-problems");
      badge.hidden = problems.length === 0;
      badge.textContent = problems.length === 1 ? "1 problem" : `${problems.length} problems`;
      element.title = problems.map((problem) => problemText(problem)).join("\n");
      element.querySelectorAll(".inputs .input").forEach((dot) => {
        const broken = problems.some((problem) => problem.field === dot.dataset.port);
        dot.classList.toggle("port-error", broken);
      });
    }
  }

  function problemText(problem) {
    return problem.field ? `${problem.field}: ${problem.message}` : problem.message;
  }

  function problemOwner(problem) {
    if (!problem.item) return "Workflow";
    return `${nodeTitle(problem.section, problem.item)} “${displayName(problem.item)}”`;
  }

  function renderProblems() {
    const items = currentProblems().map((problem) => {
      const text = el("span", {}, el("strong", {}, problemOwner(problem)), ` ${problemText(problem)}`);
      if (!problem.item) return el("li", { class: "problem" }, text);
      const button = el("button", { type: "button", class: "problem-link" }, text);
      button.addEventListener("click", () => {
        if (state.activeTab !== "graph") showTab("graph");
        if (state.activeTab === "graph") selectNode(problem.item);
      });
      return el("li", { class: "problem" }, button);
    });
    for (const warning of state.warnings) {
      items.push(el("li", { class: "warning" }, `Warning: ${warning}`));
    }
    if (items.length === 0) {
      const checked = dom.status.dataset.state === "valid";
      items.push(el("li", { class: "muted" }, checked ? "No problems found." : "Not checked yet."));
    }
    dom.problems.replaceChildren(...items);
  }

  // Put .field-error messages next to the side panel's fields.  Problems that
  // name no field of the panel are listed at the top of the panel.
  function updatePanelErrors() {
    dom.panel.querySelectorAll(".field-error, .node-errors").forEach((node) => node.remove());
    dom.panel.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
    if (!state.selected || state.activeTab !== "graph") return;
    const messages = new Map();
    for (const [field, message] of state.localErrors) messages.set(field, [message]);
    const unplaced = [];
    for (const problem of problemsOf(state.selected.item)) {
      const row = problem.field
        && dom.panel.querySelector(`[data-field-row="${CSS.escape(problem.field)}"]`);
      if (!row) {
        unplaced.push(problemText(problem));
        continue;
      }
      if (!messages.has(problem.field)) messages.set(problem.field, []);
      messages.get(problem.field).push(problem.message);
    }
    for (const [field, list] of messages) {
      const row = dom.panel.querySelector(`[data-field-row="${CSS.escape(field)}"]`);
      if (!row) continue;
      const control = row.querySelector("[data-field]");
      control.setAttribute("aria-invalid", "true");
      for (const message of list) {
        control.after(el("p", { class: "field-error", role: "alert" }, message));
      }
    }
    if (unplaced.length) {
      const list = el("ul", { class: "node-errors" },
        ...unplaced.map((text) => el("li", {}, text)));
      dom.panel.querySelector(".panel-head").after(list);
    }
  }

  function showProblems() {
    decorateNodes();
    updatePanelErrors();
    renderProblems();
  }

  function setStatus(name, text) {
    dom.status.dataset.state = name;
    dom.status.textContent = text;
  }

  // ---------------------------------------------------------------------
  // Server requests

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function apiRequest(method, url, body) {
    const options = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.headers["X-CSRFToken"] = csrfToken();
      options.body = JSON.stringify(body);
    }
    return fetch(url, options);
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (error) {
      return null;
    }
  }

  // Turn a response into {ok, errors, warnings, message}.  A 400 with
  // blocks_errors is an invalid definition; anything else that fails is a
  // general problem.
  async function readOutcome(response) {
    const body = await readJson(response);
    if (response.ok) {
      return { ok: true, status: response.status, body, errors: [], warnings: (body && body.warnings) || [] };
    }
    if (body && Array.isArray(body.blocks_errors)) {
      return { ok: false, body, errors: body.blocks_errors, warnings: [], message: body.message };
    }
    const message = (body && (body.message || body.detail))
      || `${response.status} ${response.statusText}`;
    return {
      ok: false, status: response.status, body, errors: [], warnings: [], message, requestFailed: true,
    };
  }

  function applyOutcome(outcome) {
    state.serverErrors = outcome.errors;
    state.warnings = outcome.warnings;
    state.generalError = outcome.requestFailed ? outcome.message : null;
    if (outcome.ok) {
      setStatus("valid", outcome.warnings.length ? `Valid, ${outcome.warnings.length} warning(s)` : "Valid");
      clearSaveError("definition");
    } else if (outcome.requestFailed) {
      setStatus("error", "Could not check");
    } else {
      const count = outcome.errors.length;
      setStatus("invalid", count === 1 ? "1 problem" : `${count} problems`);
    }
    showProblems();
  }

  function scheduleValidation() {
    // Any response to an earlier request is stale from now on.
    state.validationSeq += 1;
    setStatus("pending", "Checking…");
    clearTimeout(validateTimer);
    validateTimer = setTimeout(validateNow, VALIDATE_DELAY_MS);
  }

  async function validateNow() {
    clearTimeout(validateTimer);
    const sequence = state.validationSeq;
    let outcome;
    try {
      const response = await apiRequest("POST", "/api/validate", { definition: state.definition });
      outcome = await readOutcome(response);
    } catch (error) {
      outcome = {
        ok: false, errors: [], warnings: [], requestFailed: true,
        message: `Validation request failed: ${error.message}`,
      };
    }
    if (sequence === state.validationSeq) applyOutcome(outcome);
    return outcome;
  }

  async function save() {
    // Ctrl+S does not go through the disabled Save button, so a save that
    // starts while another is on its way is dropped here.
    if (state.saving) return { ok: false, message: "A save is already in progress." };
    if (state.activeTab === "json" && !applyJsonText()) {
      showSaveMessage("error", "Not saved: the JSON has an error, shown under it.", "json");
      return { ok: false, message: dom.jsonError.textContent };
    }
    const name = dom.name.value.trim();
    if (!name) {
      showSaveMessage("error", "Enter a workflow name before saving.", "name");
      dom.name.focus();
      return { ok: false, message: "The workflow name is missing." };
    }

    const isNew = state.workflowId === null;
    const savingChange = state.changeCount;
    const body = { name, definition: state.definition };
    // The server rejects the save with 409 version_conflict when the
    // workflow has a newer version, or any change (a rename too), since
    // this tab loaded or saved it.
    const baseVersion = state.savedVersion;
    if (!isNew && baseVersion !== null) body.base_version = baseVersion;
    if (!isNew && state.savedRevision !== null) body.base_revision = state.savedRevision;
    dom.save.disabled = true;
    state.saving = true;
    showSaveMessage("pending", "Saving…");
    let outcome;
    try {
      const response = await apiRequest(isNew ? "POST" : "PUT",
        isNew ? "/api/workflows/" : `/api/workflows/${state.workflowId}`, body);
      outcome = await readOutcome(response);
    } catch (error) {
      outcome = { ok: false, errors: [], warnings: [], requestFailed: true, message: error.message };
    } finally {
      dom.save.disabled = false;
      state.saving = false;
    }

    if (outcome.ok) {
      savedWorkflow(outcome.body, isNew, savingChange);
      applyOutcome(outcome);
      return { ok: true, version: outcome.body.version, id: outcome.body.id };
    }
    if (outcome.body && outcome.body.code === "version_conflict") {
      const message = await conflictMessage(baseVersion, outcome.message);
      showSaveMessage("error", message);
      return { ok: false, conflict: true, message };
    }
    if (!isNew && outcome.status === 404) {
      // The workflow was deleted, in another tab or through the API, since
      // this tab loaded it. The next save creates a new workflow, so the
      // edits in this tab are not lost.
      forgetDeletedWorkflow();
      const message = `Not saved: workflow ${body.name ? `“${body.name}” ` : ""}was deleted `
        + "after this tab opened it. Save again to keep these edits as a new workflow.";
      showSaveMessage("error", message);
      return { ok: false, deleted: true, message };
    }
    if (outcome.requestFailed) {
      showSaveMessage("error", `Not saved: ${outcome.message}`);
    } else {
      applyOutcome(outcome);
      showSaveMessage("error", "Not saved: the definition has problems, listed under Problems.",
        "definition");
    }
    return { ok: false, message: outcome.message };
  }

  // Return the message for a save rejected because the workflow changed
  // since this tab loaded or saved baseVersion, with the server's current
  // version. Nothing in the tab changes, so the edits stay.
  async function conflictMessage(baseVersion, serverMessage) {
    let latest = null;
    try {
      const response = await apiRequest("GET", `/api/workflows/${state.workflowId}`);
      const body = await readJson(response);
      if (response.ok && body) latest = body.version;
    } catch (error) {
      latest = null;
    }
    let now = "";
    if (latest === baseVersion) now = " (same version; its name or description changed)";
    else if (latest !== null) now = ` (now version ${latest})`;
    return `Not saved: this workflow changed since this tab loaded or saved version ${baseVersion}${now}. `
      + "Reload to see it; your edits are kept in this tab until you do."
      + (latest === null && serverMessage ? ` Server: ${serverMessage}` : "");
  }

  function forgetDeletedWorkflow() {
    state.workflowId = null;
    state.savedVersion = null;
    state.savedRevision = null;
    // Nothing in this tab is saved any longer.
    state.savedChangeCount = -1;
    dom.savedVersion.dataset.version = "";
    dom.savedVersion.textContent = "Not saved";
    dom.runLink.hidden = true;
    dom.runLink.removeAttribute("href");
    history.replaceState(null, "", "/workflows/new");
  }

  function savedWorkflow(body, isNew, savingChange) {
    const previous = state.savedVersion;
    state.workflowId = body.id;
    state.savedVersion = body.version;
    state.savedRevision = body.revision;
    state.savedChangeCount = savingChange;
    dom.savedVersion.dataset.version = String(body.version);
    dom.savedVersion.textContent = body.version === previous
      ? `Saved; definition unchanged, version ${body.version}`
      : `Saved as version ${body.version}`;
    // Edits made while the save was on its way are not in this version.
    showUnsavedChanges();
    showSaveMessage(null, "");
    if (isNew) {
      history.replaceState(null, "", `/workflows/${body.id}/edit`);
      dom.runLink.href = `/workflows/${body.id}/run/`;
      dom.runLink.hidden = false;
    }
    document.title = `Edit ${body.name} · Glassbox`;
  }

  function showSaveMessage(kind, text, cause = null) {
    dom.saveMessage.hidden = !text;
    dom.saveMessage.textContent = text;
    dom.saveMessage.dataset.kind = kind || "";
    state.saveErrorCause = cause;
  }

  // Remove the save error about cause, which is fixed now. The workflow is
  // still unsaved, and the page still warns before leaving it.
  function clearSaveError(cause) {
    if (state.saveErrorCause === cause) showSaveMessage(null, "");
  }

  // ---------------------------------------------------------------------
  // JSON tab

  // Roboflow's workflow API returns a definition wrapped as
  // {"workflow": {"config": "<JSON text of {\"specification\": {...}}>"}}.
  // Unwrap that form, or any inner part of it, down to the object with
  // "steps".  Returns the definition and the keys removed (null if none).
  function unwrapRoboflowExport(value) {
    let current = value;
    const path = [];
    for (let depth = 0; depth < 4 && isPlainObject(current) && !("steps" in current); depth += 1) {
      if (isPlainObject(current.workflow)) {
        current = current.workflow;
        path.push("workflow");
      } else if (typeof current.config === "string") {
        try {
          current = JSON.parse(current.config);
        } catch (error) {
          break;
        }
        path.push("config");
      } else if (isPlainObject(current.config)) {
        current = current.config;
        path.push("config");
      } else if (isPlainObject(current.specification)) {
        current = current.specification;
        path.push("specification");
      } else {
        break;
      }
    }
    return { definition: current, unwrapped: path.length ? path.join(" → ") : null };
  }

  // The graph can only show an object whose sections are lists.
  function shapeProblem(definition) {
    if (!isPlainObject(definition)) return "The definition must be a JSON object.";
    for (const section of SECTIONS) {
      if (section in definition && !Array.isArray(definition[section])) {
        return `'${section}' must be a list.`;
      }
    }
    return null;
  }

  // Parse the JSON tab into the definition.  Returns false, and shows why,
  // when the text cannot be used; the text itself is never changed then.
  function applyJsonText() {
    clearTimeout(jsonTimer);
    let parsed;
    try {
      parsed = JSON.parse(dom.json.value);
    } catch (error) {
      showJsonError(`Invalid JSON: ${error.message}. Fix it to switch to the graph or save.`);
      return false;
    }
    const { definition, unwrapped } = unwrapRoboflowExport(parsed);
    const problem = shapeProblem(definition);
    if (problem) {
      showJsonError(problem);
      return false;
    }
    showJsonError(null);
    const renamed = useFieldNames(definition);
    const notes = [];
    if (unwrapped) notes.push(`Imported the definition from a Roboflow export (${unwrapped}).`);
    if (renamed.length) {
      notes.push(`Renamed fields to the names this builder uses (${renamed.join(", ")}).`);
    }
    if (notes.length) {
      // The text shows what the graph now holds.
      dom.json.value = prettyJson(definition);
      dom.jsonNote.hidden = false;
      dom.jsonNote.textContent = notes.join(" ");
    }
    if (JSON.stringify(definition) !== JSON.stringify(state.definition)) {
      replaceDefinition(definition, "json");
    }
    return true;
  }

  // The status badge describes the last definition checked. While the JSON
  // text cannot be read, the badge shows that instead.
  function showJsonError(message) {
    dom.jsonError.hidden = !message;
    dom.jsonError.textContent = message || "";
    if (!message) clearSaveError("json");
    if (message) {
      // A check of the previous definition that is still on its way would
      // otherwise overwrite this.
      state.validationSeq += 1;
      clearTimeout(validateTimer);
      setStatus("invalid", "Invalid JSON");
      // The listed problems were found in the last readable definition.
      dom.problems.replaceChildren(
        el("li", { class: "problem" }, el("strong", {}, "JSON"), ` ${message}`));
    } else if (dom.status.dataset.state === "invalid" && dom.status.textContent === "Invalid JSON") {
      scheduleValidation();
    }
  }

  function showTab(tab) {
    if (tab === state.activeTab) return;
    if (tab === "graph" && !applyJsonText()) return;
    state.activeTab = tab;
    dom.tabGraph.setAttribute("aria-selected", String(tab === "graph"));
    dom.tabJson.setAttribute("aria-selected", String(tab === "json"));
    dom.graphView.hidden = tab !== "graph";
    dom.jsonView.hidden = tab !== "json";
    if (tab === "json") {
      capturePositions();
      dom.json.value = prettyJson(state.definition);
      dom.jsonNote.hidden = true;
      showJsonError(null);
    } else {
      // Drawflow measures ports to draw lines, which fails while hidden.
      renderGraph();
    }
    renderPanel();
  }

  // ---------------------------------------------------------------------
  // Side panel

  function renderPanel() {
    const selected = state.selected;
    let parts;
    if (state.activeTab !== "graph") parts = jsonTabPanel();
    else if (!selected) parts = overviewPanel();
    else if (selected.section === "steps") parts = stepPanel(selected.item);
    else if (selected.section === "inputs") parts = inputPanel(selected.item);
    else parts = outputPanel(selected.item);
    dom.panel.replaceChildren(...parts);
    updatePanelErrors();
  }

  function panelHead(title, subtitle, description) {
    return el("div", { class: "panel-head" },
      el("h2", {}, title),
      subtitle ? el("p", { class: "panel-subtitle" }, subtitle) : null,
      description ? el("p", { class: "panel-description" }, description) : null);
  }

  // Node fields are not editable beside the JSON text, so that an edit here
  // can never overwrite text that does not parse yet.
  function jsonTabPanel() {
    return [
      panelHead("JSON", null, "The definition is edited as text here. Switch to Graph to edit nodes."),
    ];
  }

  function overviewPanel() {
    const counts = SECTIONS.map((section) => {
      const count = sectionItems(section).length;
      return `${count} ${count === 1 ? section.slice(0, -1) : section}`;
    });
    return [
      panelHead("Workflow", counts.join(", "), null),
      el("ul", { class: "panel-tips" },
        el("li", {}, "Click a node, or Tab to it and press Enter, to edit its fields here."),
        el("li", {}, "Arrow keys move the focused node; Shift moves it further."),
        el("li", {}, "Drag from an output dot (right) to an input dot (left) to connect."),
        el("li", {}, "Select a node or line and press Delete to remove it."),
        el("li", {}, "Ctrl + mouse wheel zooms; drag the background to pan.")),
    ];
  }

  // A labelled control; data-field names the control, data-field-row its row.
  function fieldRow({ name, label, control, kind, help, meta }) {
    control.id = `field-${name}`;
    control.dataset.field = name;
    return el("div", { class: "field", "data-field-row": name },
      el("label", { for: control.id },
        el("span", { class: "field-name" }, label || name),
        kind ? el("span", { class: `kind kind-${kindClass(kind)}` }, kindLabel(kind)) : null),
      control,
      help ? el("p", { class: "field-help" }, help) : null,
      meta ? el("p", { class: "field-meta" }, meta) : null);
  }

  function nameRow(section, item) {
    const control = el("input", { type: "text", autocomplete: "off", spellcheck: "false" });
    control.value = item.name ?? "";
    control.addEventListener("change", () => {
      const problem = rename(section, item, control.value.trim());
      if (problem) state.localErrors.set("name", problem);
      else state.localErrors.delete("name");
      // The panel stays, so that the focus stays where Tab moved it; only
      // its subtitle, which shows the name, is redrawn.
      const subtitle = dom.panel.querySelector(".panel-subtitle");
      const text = nameSubtitle(section, item);
      if (subtitle && text !== null) subtitle.textContent = text;
      updatePanelErrors();
    });
    return fieldRow({
      name: "name", control,
      help: "Letters, digits, '_' or '-'. Selectors use it, and renaming updates them.",
    });
  }

  function selectControl(options, current, onChange) {
    const control = el("select");
    for (const [value, label] of options) {
      control.append(el("option", { value }, label));
    }
    control.value = current;
    control.addEventListener("change", () => onChange(control.value));
    return control;
  }

  // A text field for a selector, suggesting the selectors that fit its kind.
  // The placeholder starts with "e.g." because a bare selector in it reads
  // as a value already set, while the field is empty and may be required.
  function selectorInput(item, name, kind, choices) {
    const listId = choices.length ? `choices-${name}` : null;
    const control = el("input", {
      type: "text", autocomplete: "off", spellcheck: "false", list: listId,
      placeholder: choices.length
        ? `e.g. ${choices[0]}`
        : "$inputs.<name> or $steps.<step>.<output>",
    });
    control.value = typeof item[name] === "string" ? item[name] : formatValue(item[name]);
    control.addEventListener("input", () => {
      const text = control.value.trim();
      setItemValue(item, name, text === "" ? undefined : text);
    });
    const list = listId
      ? el("datalist", { id: listId }, ...choices.map((choice) => el("option", { value: choice })))
      : null;
    return [control, list];
  }

  // A text field for a JSON value (see parseValue); objects and lists get a
  // textarea.  With suggest, it offers the parameters, and the value outputs
  // unless stepOutputs is false (a field the compiler takes no step output in).
  function valueInput(item, name, { placeholder, suggest = true, stepOutputs = true } = {}) {
    const current = item[name];
    const multiline = current !== null && typeof current === "object";
    const choices = suggest && !multiline
      ? selectorChoices(VALUE_KIND, item)
        .filter((choice) => stepOutputs || !choice.startsWith("$steps."))
      : [];
    // A model_id field also suggests the models this user can run.
    const models = suggest && !multiline && name === "model_id" ? state.models : [];
    const listId = choices.length || models.length ? `choices-${name}` : null;
    const control = multiline
      ? el("textarea", { rows: 3, spellcheck: "false" })
      : el("input", { type: "text", autocomplete: "off", spellcheck: "false", list: listId });
    control.value = formatValue(current);
    if (placeholder) control.placeholder = placeholder;
    control.addEventListener("input", () => setItemValue(item, name, parseValue(control.value)));
    const options = [
      ...models.map((model) => el("option", { value: model.id, label: model.note })),
      ...choices.map((choice) => el("option", { value: choice })),
    ];
    const list = listId ? el("datalist", { id: listId }, ...options) : null;
    return [control, list];
  }

  function blockFieldRow(item, field) {
    const meta = field.required
      ? "Required."
      : `Optional. Default: ${formatValue(field.default)}.`;
    const isValue = field.kind === VALUE_KIND;
    const [control, list] = editedAsJson(field)
      ? valueInput(item, field.name, {
        placeholder: field.required ? "" : `default: ${formatValue(field.default)}`,
        suggest: isValue,
        stepOutputs: field.step_outputs !== false,
      })
      : selectorInput(item, field.name, field.kind, selectorChoices(field.kind, item));
    let help = field.description;
    if (isValue) help += " JSON, plain text, or a $inputs/$steps selector.";
    else if (editedAsJson(field)) help += " JSON.";
    const row = fieldRow({ name: field.name, control, kind: field.kind, help, meta });
    if (list) row.append(list);
    return row;
  }

  function typeRow(item) {
    const options = state.blocks.map((block) => [block.type, block.title]);
    const known = blockFor(item.type);
    if (!known) options.unshift([String(item.type), `${item.type} (unknown)`]);
    const control = selectControl(options, known ? known.type : String(item.type), (value) => {
      item.type = value;
      definitionChanged({ redrawPanel: true });
    });
    return fieldRow({ name: "type", control, help: "Block type. Changing it keeps every field: those the new type does not use are listed below, and the server ignores them." });
  }

  function deleteButton(item) {
    const button = el("button", { type: "button", class: "secondary danger", id: "delete-node" }, "Delete node");
    button.addEventListener("click", () => {
      const id = nodeIdOf(item);
      // Removing through Drawflow fires its events, which update the definition.
      if (id !== null && state.activeTab === "graph") editor.removeNodeId(`node-${id}`);
    });
    return el("div", { class: "panel-actions" }, button);
  }

  function stepPanel(item) {
    const block = blockFor(item.type);
    const parts = [block
      ? panelHead(block.title, block.type, block.description)
      : panelHead("Unknown block", String(item.type), "No installed block has this type; choose one below.")];
    parts.push(typeRow(item), nameRow("steps", item));
    if (block) {
      for (const field of block.fields) parts.push(blockFieldRow(item, field));
      const known = new Set(["type", "name", ...block.fields.map((field) => field.name)]);
      const extra = Object.keys(item).filter((key) => !known.has(key));
      if (extra.length) {
        parts.push(el("p", { class: "field-meta" },
          `Keys this block does not use (the server ignores them): ${extra.join(", ")}.`));
      }
    } else {
      for (const key of Object.keys(item)) {
        if (key === "type" || key === "name") continue;
        const [control, list] = valueInput(item, key);
        const row = fieldRow({ name: key, control });
        if (list) row.append(list);
        parts.push(row);
      }
    }
    parts.push(deleteButton(item));
    return parts;
  }

  // The subtitle of an input's or output's panel, which shows its name; null
  // for a step, whose subtitle is its type.
  function nameSubtitle(section, item) {
    if (section === "inputs") return hasName(item) ? `$inputs.${item.name}` : "(no name)";
    if (section === "outputs") return hasName(item) ? `returned as "${item.name}"` : "(no name)";
    return null;
  }

  function inputPanel(item) {
    const isImage = isImageInput(item);
    const types = [...IMAGE_INPUT_TYPES, ...PARAMETER_INPUT_TYPES];
    if (!types.includes(item.type)) types.unshift(String(item.type));
    const typeControl = selectControl(types.map((type) => [type, type]), String(item.type), (value) => {
      item.type = value;
      if (IMAGE_INPUT_TYPES.includes(value)) delete item.default_value;
      definitionChanged({ redrawPanel: true });
    });
    const parts = [
      panelHead(nodeTitle("inputs", item), nameSubtitle("inputs", item),
        isImage ? "An image given when the workflow runs." : "A value given when the workflow runs."),
      fieldRow({ name: "type", control: typeControl }),
      nameRow("inputs", item),
    ];
    if (!isImage) {
      const [control] = valueInput(item, "default_value", {
        placeholder: "no default: runs must pass it", suggest: false,
      });
      parts.push(fieldRow({
        name: "default_value", label: "default value", control,
        help: "Used when a run does not pass this parameter. JSON or plain text.",
      }));
    }
    parts.push(deleteButton(item));
    return parts;
  }

  function outputPanel(item) {
    const [selector, list] = selectorInput(item, "selector", ANY_KIND, selectorChoices("output", null));
    const coordinates = selectControl(
      [["", "not set (own)"], ["own", "own"], ["parent", "parent"]],
      item.coordinates_system || "",
      (value) => setItemValue(item, "coordinates_system", value || undefined),
    );
    const selectorRow = fieldRow({
      name: "selector", control: selector,
      help: "What to return: $steps.<step>.<output>, $steps.<step>.* for all of a step's outputs, or $inputs.<name>.",
    });
    if (list) selectorRow.append(list);
    return [
      panelHead("Output", nameSubtitle("outputs", item), null),
      nameRow("outputs", item),
      selectorRow,
      fieldRow({
        name: "coordinates_system", label: "coordinates", control: coordinates,
        help: "For detections on crops: boxes relative to the crop (own) or to the original image (parent).",
      }),
      deleteButton(item),
    ];
  }

  // ---------------------------------------------------------------------
  // Palette

  function renderPalette(loadError) {
    const groups = [paletteGroup("Inputs and outputs", SPECIAL_NODES)];
    if (loadError) {
      groups.push(el("p", { class: "error" }, `Could not load the blocks: ${loadError}. Reload the page to retry.`));
    } else {
      groups.push(paletteGroup("Blocks", state.blocks));
    }
    dom.paletteItems.replaceChildren(...groups);
  }

  function paletteGroup(title, entries) {
    return el("section", { class: "palette-group" },
      el("h2", {}, title),
      ...entries.map(paletteItem));
  }

  function paletteItem(entry) {
    const item = el("div", {
      class: "palette-item", role: "button", tabindex: 0, draggable: "true",
      "data-block-type": entry.type, title: `${entry.description}\n${entry.type}`,
    }, el("span", { class: "palette-title" }, entry.title),
    el("span", { class: "palette-description" }, entry.description));
    item.addEventListener("dragstart", (event) => {
      event.dataTransfer.setData(DRAG_MIME, entry.type);
      event.dataTransfer.effectAllowed = "copy";
    });
    const add = () => {
      if (state.activeTab !== "graph") showTab("graph");
      if (state.activeTab === "graph") addNodeOfType(entry.type);
    };
    item.addEventListener("click", add);
    item.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        add();
      }
    });
    return item;
  }

  function bindCanvasDrop() {
    dom.canvas.addEventListener("dragover", (event) => {
      if (!event.dataTransfer.types.includes(DRAG_MIME)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    });
    dom.canvas.addEventListener("drop", (event) => {
      const type = event.dataTransfer.getData(DRAG_MIME);
      if (!type) return;
      event.preventDefault();
      // Centre the node's title under the pointer.
      const point = canvasPoint(event.clientX, event.clientY);
      addNodeOfType(type, { position: { x: point.x - NODE_WIDTH_PX / 2, y: point.y - NODE_HEAD_PX / 2 } });
    });
  }

  // ---------------------------------------------------------------------
  // Start-up

  function cacheDom() {
    const byId = (id) => document.getElementById(id);
    Object.assign(dom, {
      root: byId("builder"),
      canvas: byId("drawflow"),
      paletteItems: byId("palette-items"),
      panel: byId("node-panel"),
      problems: byId("problems"),
      status: byId("validation-status"),
      name: byId("workflow-name"),
      save: byId("save"),
      savedVersion: byId("saved-version"),
      saveMessage: byId("save-message"),
      runLink: byId("run-link"),
      tabGraph: byId("tab-graph"),
      tabJson: byId("tab-json"),
      graphView: byId("graph-view"),
      jsonView: byId("json-view"),
      json: byId("definition-json"),
      jsonError: byId("json-error"),
      jsonNote: byId("json-note"),
    });
  }

  function bindUi() {
    dom.tabGraph.addEventListener("click", () => showTab("graph"));
    dom.tabJson.addEventListener("click", () => showTab("json"));
    dom.json.addEventListener("input", () => {
      clearTimeout(jsonTimer);
      jsonTimer = setTimeout(applyJsonText, JSON_APPLY_DELAY_MS);
    });
    dom.save.addEventListener("click", (event) => {
      // The button is disabled while a save is on its way, but a rejected
      // save can get its response before the second click of a double-click
      // arrives. That click (detail 2 or more) would send the same draft
      // again, so only the first click of a series saves.
      if (event.detail > 1) return;
      save();
    });
    dom.name.addEventListener("input", () => {
      state.changeCount += 1;
      showUnsavedChanges();
      if (dom.name.value.trim()) clearSaveError("name");
    });
    document.getElementById("zoom-in").addEventListener("click", () => editor.zoom_in());
    document.getElementById("zoom-out").addEventListener("click", () => editor.zoom_out());
    document.getElementById("auto-layout").addEventListener("click", autoLayout);
    dom.canvas.addEventListener("keydown", onCanvasKeydown, true);
    // The browser scrolls the canvas element to show a focused node, before
    // focusin, and Drawflow's pan and zoom do not expect a scrolled canvas.
    // The scroll is undone, and revealNode pans instead.
    const unscroll = () => {
      dom.canvas.scrollTop = 0;
      dom.canvas.scrollLeft = 0;
    };
    dom.canvas.addEventListener("scroll", unscroll);
    dom.canvas.addEventListener("focusin", (event) => {
      unscroll();
      if (event.target.matches(".drawflow-node:focus-visible")) revealNode(event.target);
    });
    document.addEventListener("keydown", (event) => {
      if ((event.ctrlKey || event.metaKey) && event.key === "s") {
        event.preventDefault();
        save();
      }
    });
    window.addEventListener("beforeunload", (event) => {
      // Text typed in the JSON tab reaches the definition only after a short
      // delay, and only once it parses. Apply it now, and count text that
      // does not parse as an unsaved edit.
      const unreadableJson = state.activeTab === "json" && !applyJsonText();
      if (!unreadableJson && !isDirty()) return;
      event.preventDefault();
      event.returnValue = "";
    });
    bindCanvasDrop();
  }

  async function loadBlocks() {
    try {
      const response = await apiRequest("GET", "/api/blocks");
      const body = await readJson(response);
      if (!response.ok) throw new Error((body && body.message) || `${response.status} ${response.statusText}`);
      indexBlocks(body.blocks);
      return null;
    } catch (error) {
      return error.message;
    }
  }

  async function start() {
    cacheDom();
    const config = JSON.parse(document.getElementById("builder-config").textContent);
    const workflow = config.workflow;
    state.models = config.models || [];
    state.definition = workflow && workflow.definition ? workflow.definition : emptyDefinition();
    if (workflow) {
      state.workflowId = workflow.id;
      state.savedVersion = workflow.version;
      state.savedRevision = workflow.revision;
    }
    editor = createEditor();
    bindUi();
    const loadError = await loadBlocks();
    useFieldNames(state.definition);
    renderPalette(loadError);
    renderGraph();
    renderPanel();
    scheduleValidation();
    dom.root.dataset.ready = "true";
  }

  // ---------------------------------------------------------------------
  // Hooks for browser tests and the console

  function connect(fromNode, fromOutput, toNode, toField) {
    const fromInput = fromOutput === null || fromOutput === undefined;
    const sourceSection = fromInput ? "inputs" : "steps";
    const source = findItem(sourceSection, fromNode);
    if (!source) throw new Error(`No ${sourceSection.slice(0, -1)} named '${fromNode}'.`);
    if (!fromInput) {
      const outputs = portsOf("steps", source).outputs.map((port) => port.name);
      if (!outputs.includes(fromOutput)) {
        throw new Error(`Step '${fromNode}' has no output '${fromOutput}'; its outputs: ${outputs.join(", ")}.`);
      }
    }
    const toOutput = toField === null || toField === undefined;
    const target = findItem(toOutput ? "outputs" : "steps", toNode);
    if (!target) throw new Error(`No ${toOutput ? "output" : "step"} named '${toNode}'.`);
    const block = !toOutput && blockFor(target.type);
    if (block && !block.fields.some((field) => field.name === toField)) {
      throw new Error(`Step '${toNode}' has no field '${toField}'; its fields: `
        + block.fields.map((field) => field.name).join(", "));
    }
    const selector = selectorFor(sourceSection, source, fromOutput);
    target[toOutput ? "selector" : toField] = selector;
    definitionChanged({ redrawPanel: isSelected(target) });
    return selector;
  }

  function setField(stepName, field, value) {
    const step = findItem("steps", stepName);
    if (!step) throw new Error(`No step named '${stepName}'.`);
    if (value === undefined) delete step[field];
    else step[field] = value;
    definitionChanged({ redrawPanel: isSelected(step) });
  }

  function setDefinition(definition) {
    const problem = shapeProblem(definition);
    if (problem) throw new Error(problem);
    replaceDefinition(clone(definition), "api");
  }

  const ready = new Promise((resolve, reject) => {
    const run = () => start().then(resolve, reject);
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", run);
    else run();
  });

  window.glassboxBuilder = {
    ready,
    addStep: (type, name) => addNodeOfType(type, { name }),
    connect,
    setField,
    getDefinition: () => clone(state.definition),
    setDefinition,
    validate: validateNow,
    save,
  };
})();
