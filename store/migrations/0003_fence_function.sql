-- fence checks and advances the fencing token of one lock inside the
-- writer's transaction (DESIGN race 6). p_name_hash is sha256 of the lock
-- name, as in fences. The upsert locks the lock's row until the
-- transaction ends, also when it changes nothing, so fenced writers of one
-- lock commit in token order. A token not greater than the stored one
-- raises SQLSTATE CF001 with the stored token, in decimal, as the error's
-- DETAIL: the store turns it into a *FenceError.
--
-- It is a function, not a statement with parameters, so that the store can
-- call it in the text of its BEGIN, one simple query with no bind
-- parameters, and a fenced write costs no round trip more than an unfenced
-- one; and so it must raise, not return, a rejection, which that simple
-- query does not read. PL/pgSQL caches its plans per session.
CREATE FUNCTION {{schema}}.fence(p_name_hash bytea, p_token bigint) RETURNS void
	LANGUAGE plpgsql VOLATILE
	SET search_path = pg_catalog, pg_temp
	AS $$
	DECLARE
		stored bigint;
	BEGIN
		INSERT INTO {{schema}}.fences AS f (name_hash, token) VALUES (p_name_hash, p_token)
		ON CONFLICT (name_hash) DO UPDATE SET token = EXCLUDED.token WHERE f.token < EXCLUDED.token;
		IF FOUND THEN
			RETURN;
		END IF;
		-- The row is ours (locked by the upsert) until the transaction ends.
		SELECT f.token INTO stored FROM {{schema}}.fences f WHERE f.name_hash = p_name_hash;
		RAISE EXCEPTION 'coherent: fencing token % rejected: % is stored', p_token, stored
			USING ERRCODE = 'CF001', DETAIL = stored::text;
	END
	$$;
