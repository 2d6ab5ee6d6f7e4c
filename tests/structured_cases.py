"""The schemas, regexes and grammars the structured-output tests use (also timed by
``benchmarks/grammar_backends.py`` and ``benchmarks/structured_outputs.py``, so the compile times in
``benchmarks/README.md`` are those of the tests)."""

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "active"],
    "additionalProperties": False,
}

NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "point": {"$ref": "#/$defs/point"},
        "label": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
        "kind": {"const": "shape"},
    },
    "required": ["id", "point", "label", "kind"],
    "additionalProperties": False,
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"], "additionalProperties": False}},
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 16},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}},
                       "required": ["tz"], "additionalProperties": False},
    },
}

SCHEMAS = {"person": PERSON, "nested": NESTED, "weather_args": WEATHER_TOOL["function"]["parameters"]}

REGEX_CODE = r"[A-Z]{2}-[0-9]{3}"  # not \d: llguidance matches Unicode 16 digits that Python 3.11 re does not know
REGEX_EMAIL = r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"
REGEXES = {"code": REGEX_CODE, "email": REGEX_EMAIL}

CHOICES = ["yes", "no", "maybe"]

LARK_SUM = 'start: num ("+" num)*\nnum: /[0-9]{1,3}/\n'
GBNF_WORD = 'root ::= "(" [a-z]{1,5} ")"'
GRAMMARS = {"lark_sum": LARK_SUM, "gbnf_word": GBNF_WORD}
