// Package export_sluice_plugin_transform is {{name}}, a sluice plugin. It adds a `greeting`
// field to every JSON object it receives. Config (the stage's `config:`): {"greeting": "hello"},
// optional. build.sh generates the rest of the Go module with `wit-bindgen go`.
package export_sluice_plugin_transform

import (
	"encoding/json"
	"runtime/debug"

	witTypes "go.bytecodealliance.org/pkg/wit/types"
	. "wit_component/sluice_plugin_types"
)

var greeting = "hello"

func Init(config string) witTypes.Result[witTypes.Unit, string] {
	// Keep automatic GC inside Process only (see there).
	debug.SetGCPercent(-1)
	var settings struct {
		Greeting *string `json:"greeting"`
	}
	if config != "" {
		if err := json.Unmarshal([]byte(config), &settings); err != nil {
			return witTypes.Err[witTypes.Unit]("invalid config: " + err.Error())
		}
	}
	if settings.Greeting != nil {
		greeting = *settings.Greeting
	}
	return witTypes.Ok[witTypes.Unit, string](witTypes.Unit{})
}

func Process(batch []InputRecord) BatchResult {
	// Go's collector reads clocks, which the component model forbids while the host passes
	// arguments in; so it only runs during Process (wasmtime issue 14318).
	debug.SetGCPercent(100)
	defer debug.SetGCPercent(-1)
	var result BatchResult
	for i, record := range batch {
		var row map[string]any
		err := json.Unmarshal(record.Value, &row)
		if _, notObject := err.(*json.UnmarshalTypeError); notObject || (err == nil && row == nil) {
			result.Errors = append(result.Errors, RecordError{Input: uint32(i), Kind: ErrorKind_Schema, Message: "payload is not a JSON object"})
			continue
		}
		if err != nil {
			result.Errors = append(result.Errors, RecordError{Input: uint32(i), Kind: ErrorKind_Parse, Message: err.Error()})
			continue
		}
		row["greeting"] = greeting + " from {{name}}"
		value, _ := json.Marshal(row)
		result.Outputs = append(result.Outputs, OutputRecord{
			Input: uint32(i), Table: witTypes.None[string](), Key: witTypes.None[[]uint8](), Value: value,
		})
	}
	return result
}
