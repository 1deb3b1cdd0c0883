// render: renders a Helm chart the way `helm template` does, with Go's
// text/template and the sprig function library (the engine Helm uses), for
// machines without a helm binary. Supports what tlserve's chart uses:
// .Values (values.yaml deep-merged with -f files; numbers are float64, as
// in Helm), .Release, .Chart,
// .Capabilities, .Template, .Files.Get, and Helm's include, tpl, required,
// toYaml, fromYaml, toJson and lookup (always empty).
//
//	render -chart helm/tlserve [-f extra-values.yaml]... [-notes]
//
// Prints each rendered manifest after "# Source: CHART/templates/FILE"; a
// template's `fail` or any error exits 1 with the message on stderr.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

type valueFiles []string

func (v *valueFiles) String() string     { return strings.Join(*v, ",") }
func (v *valueFiles) Set(s string) error { *v = append(*v, s); return nil }

// Files is .Files: the chart's files by path relative to the chart.
type Files map[string][]byte

func (f Files) Get(name string) string { return string(f[name]) }

func readYAML(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return out, nil
}

// asHelmNumbers turns every integer into a float64, as Helm's values reading
// does (YAML to JSON to Go): a template that prints a large number as it
// comes (67108864 -> 6.7108864e+07) misbehaves here as it would in Helm.
func asHelmNumbers(v interface{}) interface{} {
	switch x := v.(type) {
	case int:
		return float64(x)
	case int64:
		return float64(x)
	case uint64:
		return float64(x)
	case map[string]interface{}:
		for k, e := range x {
			x[k] = asHelmNumbers(e)
		}
	case []interface{}:
		for i, e := range x {
			x[i] = asHelmNumbers(e)
		}
	}
	return v
}

// merge copies src into dst, recursing into maps (Helm's coalescing).
func merge(dst, src map[string]interface{}) {
	for k, v := range src {
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
}

func toYAML(v interface{}) string {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func main() {
	chart := flag.String("chart", "", "chart directory")
	notes := flag.Bool("notes", false, "print NOTES.txt rendered, instead of the manifests")
	var extra valueFiles
	flag.Var(&extra, "f", "values file merged over values.yaml (repeatable)")
	flag.Parse()
	if *chart == "" {
		fmt.Fprintln(os.Stderr, "usage: render -chart DIR [-f values.yaml]... [-notes]")
		os.Exit(2)
	}
	if err := run(*chart, extra, *notes); err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
}

func run(chartDir string, extra []string, notes bool) error {
	meta, err := readYAML(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	values, err := readYAML(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return err
	}
	for _, f := range extra {
		v, err := readYAML(f)
		if err != nil {
			return err
		}
		merge(values, v)
	}
	asHelmNumbers(values)
	files := Files{}
	err = filepath.Walk(chartDir, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		data, err := os.ReadFile(path) // follows symlinks, as Helm does
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(chartDir, path)
		files[rel] = data
		return nil
	})
	if err != nil {
		return err
	}
	name := fmt.Sprint(meta["name"])
	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": "tlserve", "Namespace": "default", "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Chart": map[string]interface{}{
			"Name": name, "Version": fmt.Sprint(meta["version"]),
			"AppVersion": fmt.Sprint(meta["appVersion"]), "Description": fmt.Sprint(meta["description"]),
		},
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{"Version": "v1.29.0", "Major": "1", "Minor": "29",
				"GitVersion": "v1.29.0"},
		},
		"Files":    files,
		"Template": map[string]interface{}{"BasePath": name + "/templates"},
	}

	t := template.New("chart")
	funcs := sprig.TxtFuncMap()
	funcs["include"] = func(n string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := t.ExecuteTemplate(&buf, n, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		c, err := t.Clone()
		if err != nil {
			return "", err
		}
		tt, err := c.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = tt.Execute(&buf, data)
		return buf.String(), err
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf("%s", msg)
		}
		return v, nil
	}
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		out := map[string]interface{}{}
		_ = yaml.Unmarshal([]byte(s), &out)
		return out
	}
	funcs["lookup"] = func(...interface{}) map[string]interface{} { return map[string]interface{}{} }
	t.Funcs(funcs).Option("missingkey=zero")

	var names []string
	for rel, data := range files {
		if !strings.HasPrefix(rel, "templates/") {
			continue
		}
		full := name + "/" + rel
		if _, err := t.New(full).Parse(string(data)); err != nil {
			return err
		}
		names = append(names, full)
	}
	sort.Strings(names)
	for _, n := range names {
		base := filepath.Base(n)
		if strings.HasPrefix(base, "_") || (base == "NOTES.txt") != notes {
			continue
		}
		if !strings.HasSuffix(base, ".yaml") && !strings.HasSuffix(base, ".txt") {
			continue
		}
		tmpl := t.Lookup(n)
		data := map[string]interface{}{}
		for k, v := range top {
			data[k] = v
		}
		data["Template"] = map[string]interface{}{"Name": n, "BasePath": name + "/templates"}
		var buf bytes.Buffer
		if err := tmpl.Execute(&buf, data); err != nil {
			return err
		}
		out := strings.ReplaceAll(buf.String(), "<no value>", "")
		if notes {
			fmt.Print(out)
			continue
		}
		if strings.TrimSpace(out) == "" {
			continue
		}
		fmt.Printf("---\n# Source: %s\n%s\n", n, strings.TrimSpace(out))
	}
	return nil
}
