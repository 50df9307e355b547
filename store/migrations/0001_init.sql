-- Fencing tokens, one row per lock: a write commits only with a token
-- greater than the one stored (DESIGN race 6). name_hash is sha256 of the
-- lock name, so that names of any length fit the index.
CREATE TABLE {{schema}}.fences (
	name_hash bytea PRIMARY KEY,
	token     bigint NOT NULL
);

-- The transactional outbox: one row per (namespace, key) with a change not
-- yet confirmed published. Writers upsert it in their transaction, so the
-- table never holds more rows than distinct keys written while the bus was
-- down. seq identifies the latest upsert: a writer deletes the row after
-- publishing only if nobody changed it since.
CREATE SEQUENCE {{schema}}.outbox_seq;

CREATE TABLE {{schema}}.outbox (
	key_hash    bytea       PRIMARY KEY,
	namespace   bytea       NOT NULL,
	key         bytea       NOT NULL,
	version     bigint      NOT NULL DEFAULT 0, -- 0: unknown
	seq         bigint      NOT NULL DEFAULT nextval('{{schema}}.outbox_seq'),
	relay_after timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX outbox_relay_after ON {{schema}}.outbox (relay_after);

CREATE FUNCTION {{schema}}.outbox_key(namespace bytea, key bytea) RETURNS bytea
	LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
	AS $$ SELECT sha256(int4send(length(namespace)) || namespace || key) $$;

-- outbox_put records a change of key in namespace at version (0: unknown),
-- to be published by the relay after delay unless a writer confirms it
-- first. It returns the row's seq. Merging two changes keeps the newest
-- known version; an unknown version wins, since it may be newer than any.
CREATE FUNCTION {{schema}}.outbox_put(p_namespace bytea, p_key bytea, p_version bigint, p_delay interval)
	RETURNS bigint LANGUAGE sql VOLATILE
	AS $$
	INSERT INTO {{schema}}.outbox AS o (key_hash, namespace, key, version, relay_after)
	VALUES ({{schema}}.outbox_key(p_namespace, p_key), p_namespace, p_key, p_version, now() + p_delay)
	ON CONFLICT (key_hash) DO UPDATE SET
		version     = CASE WHEN o.version = 0 OR EXCLUDED.version = 0 THEN 0
		                   ELSE greatest(o.version, EXCLUDED.version) END,
		seq         = nextval('{{schema}}.outbox_seq'),
		relay_after = least(o.relay_after, EXCLUDED.relay_after)
	RETURNING seq
	$$;

-- Wake the relays when a row is due now (a captured outside write); rows
-- of writers become due after their grace period and are found by polling.
CREATE FUNCTION {{schema}}.outbox_notify() RETURNS trigger
	LANGUAGE plpgsql
	AS $$
	BEGIN
		IF NEW.relay_after <= now() THEN
			PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
		END IF;
		RETURN NULL;
	END
	$$;

CREATE TRIGGER outbox_notify AFTER INSERT OR UPDATE ON {{schema}}.outbox
	FOR EACH ROW EXECUTE FUNCTION {{schema}}.outbox_notify();

-- capture_changes is the trigger function of captured tables (G4). Its
-- arguments: namespace, key column, version column ('' if none). Writes
-- made through the store set coherent.capture = 'off' for their
-- transaction: they record their own outbox rows. The upsert is written out
-- here rather than calling outbox_put, so that PL/pgSQL caches its plan.
CREATE FUNCTION {{schema}}.capture_changes() RETURNS trigger
	LANGUAGE plpgsql
	AS $$
	DECLARE
		ns      bytea := convert_to(TG_ARGV[0], 'UTF8');
		new_row jsonb;
		old_key text;
		new_key text;
		ver     bigint := 0;
	BEGIN
		IF current_setting('coherent.capture', true) = 'off' THEN
			RETURN NULL;
		END IF;
		IF TG_OP IN ('UPDATE', 'DELETE') THEN
			old_key := to_jsonb(OLD) ->> TG_ARGV[1];
		END IF;
		IF TG_OP IN ('INSERT', 'UPDATE') THEN
			new_row := to_jsonb(NEW);
			new_key := new_row ->> TG_ARGV[1];
			IF TG_ARGV[2] <> '' THEN
				ver := coalesce((new_row ->> TG_ARGV[2])::bigint, 0);
			END IF;
		END IF;
		-- A deleted row, or a key that moved away, has no version: 0.
		INSERT INTO {{schema}}.outbox AS o (key_hash, namespace, key, version, relay_after)
		SELECT {{schema}}.outbox_key(ns, c.k), ns, c.k, c.v, now()
		FROM (VALUES (CASE WHEN old_key IS DISTINCT FROM new_key THEN convert_to(old_key, 'UTF8') END, 0::bigint),
		             (convert_to(new_key, 'UTF8'), ver)) AS c (k, v)
		WHERE c.k IS NOT NULL
		ON CONFLICT (key_hash) DO UPDATE SET
			version     = CASE WHEN o.version = 0 OR EXCLUDED.version = 0 THEN 0
			                   ELSE greatest(o.version, EXCLUDED.version) END,
			seq         = nextval('{{schema}}.outbox_seq'),
			relay_after = least(o.relay_after, EXCLUDED.relay_after);
		RETURN NULL;
	END
	$$;

-- capture_truncate turns a TRUNCATE of a captured table into a flush of its
-- namespace: an outbox row with an empty key.
CREATE FUNCTION {{schema}}.capture_truncate() RETURNS trigger
	LANGUAGE plpgsql
	AS $$
	BEGIN
		IF current_setting('coherent.capture', true) = 'off' THEN
			RETURN NULL;
		END IF;
		PERFORM {{schema}}.outbox_put(convert_to(TG_ARGV[0], 'UTF8'), ''::bytea, 0, interval '0');
		RETURN NULL;
	END
	$$;

-- install_capture installs the capture triggers on a table. Called with
-- bind parameters from store.Capture; identifiers and literals are quoted
-- here by format().
CREATE FUNCTION {{schema}}.install_capture(p_table regclass, p_namespace text, p_key_column text, p_version_column text)
	RETURNS void LANGUAGE plpgsql
	AS $$
	BEGIN
		-- Nodes install capture concurrently at start-up; concurrent
		-- CREATE OR REPLACE TRIGGER on one table can fail.
		PERFORM pg_advisory_xact_lock(hashtextextended('coherent.capture.' || p_table::oid::text, 0));
		IF NOT EXISTS (SELECT 1 FROM pg_attribute
		               WHERE attrelid = p_table AND attname = p_key_column AND attnum > 0 AND NOT attisdropped) THEN
			RAISE EXCEPTION 'table % has no column %', p_table, p_key_column USING ERRCODE = 'undefined_column';
		END IF;
		IF p_version_column <> '' AND NOT EXISTS (SELECT 1 FROM pg_attribute
		               WHERE attrelid = p_table AND attname = p_version_column AND attnum > 0 AND NOT attisdropped) THEN
			RAISE EXCEPTION 'table % has no column %', p_table, p_version_column USING ERRCODE = 'undefined_column';
		END IF;
		EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s '
		               'FOR EACH ROW EXECUTE FUNCTION {{schema}}.capture_changes(%L, %L, %L)',
		               '{{name}}_capture', p_table, p_namespace, p_key_column, p_version_column);
		EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER TRUNCATE ON %s '
		               'FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.capture_truncate(%L)',
		               '{{name}}_capture_truncate', p_table, p_namespace);
	END
	$$;
