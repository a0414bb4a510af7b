// {{name}}: a sluice plugin. Adds a `greeting` field to every JSON object it receives.
// Config (the stage's `config:`): {"greeting": "hello"}, optional. build.sh turns this module
// into a component with componentize-js; `transform` implements the world's export.

let greeting = "hello";
const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

export const transform = {
  // A thrown string refuses the config.
  init(config) {
    greeting = (JSON.parse(config || "{}") ?? {}).greeting ?? "hello";
    if (typeof greeting !== "string") throw "config: `greeting` must be a string";
  },

  process(batch) {
    const outputs = [];
    const errors = [];
    batch.forEach((record, input) => {
      let row;
      try {
        row = JSON.parse(decoder.decode(record.value));
      } catch (e) {
        errors.push({ input, kind: "parse", message: `payload is not JSON: ${e.message}` });
        return;
      }
      if (row === null || typeof row !== "object" || Array.isArray(row)) {
        errors.push({ input, kind: "schema", message: "payload is not a JSON object" });
        return;
      }
      row.greeting = `${greeting} from {{name}}`;
      outputs.push({ input, value: encoder.encode(JSON.stringify(row)), headers: [] });
    });
    return { outputs, errors };
  },
};
